"""Key layout of one cluster in the coordination store. The only place paths are spelled.

Everything lives under ``/cbctl/<cluster>/``:

=========================  ==============================================================
``rollout``                the rollout document (JSON), written only by CAS on its revision
``audit/<from-rev>-<id>``  one audit entry per mutation, written in the same transaction as
                           the document; keyed by the revision it replaced (plus a random id),
                           so its own ``mod_revision`` is the new document revision
``nodes/<node-id>``        a node's registration record, attached to the node's lease
``identity/<node-id>``     last machine identity seen for a node id (unleased, for stability)
``conflicts/<node-id>/..`` unstable node ids (evidence, unleased)
``refused/<node-id>/<id>`` refused duplicate starts (leased: they expire on their own)
``lanes/<lane>``           the lane's owner record, attached to the owner's lease; its
                           ``create_revision`` is the lane's fencing token
``runbooks/<run-id>``      runbook run records (drills)
``preflight/last``         the last preflight result
=========================  ==============================================================
"""

from __future__ import annotations


def root(cluster: str) -> str:
    return f"/cbctl/{cluster}/"


def rollout(cluster: str) -> str:
    return f"/cbctl/{cluster}/rollout"


def audit_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/audit/"


def audit(cluster: str, from_revision: int, unique: str) -> str:
    # Zero-padded so that key order is revision order; ``unique`` (random) keeps two entries
    # from one base revision apart — possible only if the document was deleted and re-created.
    return f"{audit_prefix(cluster)}{from_revision:020d}-{unique}"


def nodes_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/nodes/"


def node(cluster: str, node_id: str) -> str:
    return f"{nodes_prefix(cluster)}{node_id}"


def identity_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/identity/"


def identity(cluster: str, node_id: str) -> str:
    return f"{identity_prefix(cluster)}{node_id}"


def conflicts_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/conflicts/"


def conflict(cluster: str, node_id: str, instance_id: str) -> str:
    return f"{conflicts_prefix(cluster)}{node_id}/{instance_id}"


def refusals_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/refused/"


def refusal(cluster: str, node_id: str, instance_id: str) -> str:
    return f"{refusals_prefix(cluster)}{node_id}/{instance_id}"


def lanes_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/lanes/"


def lane(cluster: str, lane_id: str) -> str:
    return f"{lanes_prefix(cluster)}{lane_id}"


def runbooks_prefix(cluster: str) -> str:
    return f"/cbctl/{cluster}/runbooks/"


def runbook_run(cluster: str, run_id: str) -> str:
    return f"{runbooks_prefix(cluster)}{run_id}"


def preflight_last(cluster: str) -> str:
    return f"/cbctl/{cluster}/preflight/last"
