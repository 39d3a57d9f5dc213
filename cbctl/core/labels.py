"""Label names shared by the exporter (cbctl/core/metrics.py) and every query that selects by
them (cbctl/core/gates.py, cbctl/core/criteria.py).  Standard library only: importing it is free."""

#: Every series an agent exports carries its cluster under this label.
CLUSTER_LABEL = "cluster"

__all__ = ["CLUSTER_LABEL"]
