"""Label names shared by the exporter (cbctl/core/model/metrics.py) and every query that selects by
them (cbctl/core/model/gate_settings.py, cbctl/core/operator/criteria.py).  Standard library only: importing it is free."""

#: Every series an agent exports carries its cluster under this label.
CLUSTER_LABEL = "cluster"

__all__ = ["CLUSTER_LABEL"]
