"""Which Flower node is which worker: the server binds each node to its
partition and believes no later claim.

A reply names its partition (``metrics["partition-id"]``), and nothing but
the node itself vouches for that. So the server keeps a binding node id ->
partition and checks every claim against it (:meth:`NodeBinding.resolve`):

* a claim outside ``0..N-1`` is rejected;
* a bound node claiming another partition is rejected (impersonation);
* an unbound node claiming a partition that another node holds is rejected;
* two unbound nodes claiming the same partition in one round are both
  rejected (neither can be told from the other);
* otherwise an unbound node is bound to its claim (first contact).

Where the operator pins partitions to SuperNode keys (``server.node_keys``, a
file of ``PARTITION PUBLIC-KEY`` lines, the OpenSSH ``.pub`` text that was
registered with ``flwr supernode register``), the binding comes from the
keys instead: Flower 1.41's ``Grid.get_nodes()`` returns, under the
Deployment Runtime, each node's ``NodeInfo`` with the ``public_key`` it
authenticated with (PEM SubjectPublicKeyInfo). A node with a pinned key is
bound to that key's partition before it ever speaks; a node whose key is not
pinned is bound to nothing and every reply from it is rejected. In
simulation Flower gives every node a random node id and a random "key", so
only first-contact binding applies.

**Without pins the binding is trust on first use.** Whoever answers
``query.identify`` first with a partition id holds that partition for the
run (and the resumed run): a squatter that claims partition p before p's
rightful node has been bound takes p, and the rightful node is refused from
then on. The server cannot tell them apart; it warns in the log, and counts
in :attr:`NodeBinding.conflicts` (``identity_conflicts`` in summary.json),
every claim of a partition that another node holds, and the ServerApp warns
once at start under the Deployment Runtime when ``server.node_keys`` is not
set (docs/deploy.md pins keys).

The binding is part of the server's checkpoint. A resumed run keeps it when
at least one checkpointed node id is connected again (node ids survive a
SuperNode restart with the same key, and a SuperLink restart with
``--database``); when none is (a new simulation, or a SuperLink that lost its
state), every node is new and the binding starts over.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _pem(openssh_or_pem: bytes) -> bytes:
    """A public key in the form Flower stores it (PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    text = openssh_or_pem.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
    else:
        key = serialization.load_ssh_public_key(text)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_node_keys(path, num_partitions: int) -> dict:
    """{PEM public key: partition} from ``path``: one ``PARTITION KEY`` per
    line, KEY the OpenSSH public key text (``ecdsa-sha2-nistp384 AAAA... [comment]``)
    or a path to a ``.pub`` file (relative to the file); ``#`` starts a comment.
    Raises ValueError naming the line on anything else."""
    path = Path(path).expanduser()
    pins: dict = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition(" ")
        try:
            part = int(head)
        except ValueError:
            raise ValueError(f"{path}:{no}: expected 'PARTITION PUBLIC-KEY'") from None
        if not 0 <= part < num_partitions:
            raise ValueError(f"{path}:{no}: partition {part} outside 0..{num_partitions - 1}")
        rest = rest.strip()
        blob = rest.encode()
        if not rest.startswith(("ecdsa-", "ssh-", "-----BEGIN")):
            key_path = Path(rest).expanduser()
            blob = (key_path if key_path.is_absolute() else path.parent / key_path).read_bytes()
        try:
            pem = _pem(blob)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the operator's line
            raise ValueError(f"{path}:{no}: not a public key ({exc})") from None
        if pem in pins or part in pins.values():
            raise ValueError(f"{path}:{no}: key or partition {part} listed twice")
        pins[pem] = part
    return pins


class NodeBinding:
    """node id -> partition, checked against every claim."""

    def __init__(self, num_partitions: int, pins: dict | None = None):
        self.num_partitions = int(num_partitions)
        self.pins = dict(pins or {})  # PEM public key -> partition
        self.node_partition: dict = {}  # node id -> partition
        self._seen_keys: set = set()  # node ids whose key was looked up
        self.conflicts = 0  # claims of a partition another node holds (since this start)

    def partition_of(self, node):
        return self.node_partition.get(node)

    def holder_of(self, partition):
        return next((n for n, p in self.node_partition.items() if p == partition), None)

    def pin(self, nodes) -> None:
        """Bind nodes by their authenticated public key (``NodeInfo``s from
        ``grid.get_nodes()``), when partitions are pinned to keys."""
        if not self.pins:
            return
        for info in nodes:
            node = int(info.node_id)
            if node in self._seen_keys:
                continue
            self._seen_keys.add(node)
            key = bytes(getattr(info, "public_key", b"") or b"")
            try:
                part = self.pins.get(_pem(key)) if key else None
            except Exception:  # noqa: BLE001 - not a key we know
                part = None
            if part is None:
                log.warning("node %s: its public key is pinned to no partition "
                            "(server.node_keys); its replies will be rejected", node)
                continue
            holder = self.holder_of(part)
            if holder is not None and holder != node:
                del self.node_partition[holder]  # a stale first-contact binding yields to the key
            self.node_partition[node] = part

    def resolve(self, claims: list) -> dict:
        """{node: reason or None} for one round's ``(node, claimed partition)``
        pairs; binds unbound nodes whose claim is clean."""
        reasons, first = {}, {}
        for node, claim in claims:
            bound = self.node_partition.get(node)
            if not isinstance(claim, int) or not 0 <= claim < self.num_partitions:
                reasons[node] = (f"claims partition {claim!r}, outside 0..{self.num_partitions - 1}")
            elif bound is not None:
                reasons[node] = None if claim == bound else (
                    f"claims partition {claim}, but node {node} is bound to partition {bound}")
                if claim != bound:
                    self._conflict(node, claim)
            elif self.pins:
                reasons[node] = (f"node {node}'s key is pinned to no partition "
                                 "(server.node_keys)")
            elif self.holder_of(claim) is not None:
                reasons[node] = (f"claims partition {claim}, which node "
                                 f"{self.holder_of(claim)} holds")
                self._conflict(node, claim)
            else:
                first.setdefault(claim, []).append(node)
        for claim, nodes in first.items():
            if len(nodes) == 1:
                self.node_partition[nodes[0]] = claim
                reasons[nodes[0]] = None
            else:
                for node in nodes:
                    reasons[node] = (f"claims partition {claim}, as do nodes "
                                     f"{sorted(set(nodes) - {node})} in the same first round")
        return reasons

    def _conflict(self, node, claim) -> None:
        """A claim of a partition that another node holds: a squatter, an
        impersonator, or the rightful node after a squatter came first."""
        holder = self.holder_of(claim)
        if holder is None or holder == node:
            return
        self.conflicts += 1
        how = "pinned to its key" if self.pins else "bound at first contact (trust on first use)"
        log.warning("node %s claims partition %s, which node %s holds (%s); if %s is the "
                    "rightful node, pin partitions to keys with server.node_keys", node, claim,
                    holder, how, node)

    def forget_unless_connected(self, nodes) -> None:
        """After a resume: keep the checkpointed binding if any of its nodes
        is connected, else start over (every node is new)."""
        if self.node_partition and not set(self.node_partition) & set(nodes):
            log.warning("none of the checkpointed nodes %s is connected: binding the new "
                        "nodes at first contact", sorted(self.node_partition))
            self.node_partition = {}
            self._seen_keys = set()

    def state_dict(self) -> dict:
        return {"node_partition": {int(n): int(p) for n, p in self.node_partition.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.node_partition = {int(n): int(p) for n, p in state["node_partition"].items()}


def screen_claims(binding: NodeBinding, decoded: list, server_round: int) -> tuple:
    """Split one round's decoded replies ``(node, claimed worker, Reply)`` into
    (accepted Replies, {bound worker: reason}, replies from unbound nodes).
    A rejected reply counts against the partition its node is bound to (so
    that worker is told "rejected" and restores its upload into its
    residual); one from a node bound to nothing is only counted."""
    verdict = binding.resolve([(node, worker) for node, worker, _ in decoded])
    good, rejected, unbound = [], {}, 0
    for node, worker, reply in decoded:
        why = verdict[node]
        if why is None:
            good.append(reply)
            continue
        log.warning("round %d: dropped the reply of node %s: %s", server_round, node, why)
        bound = binding.partition_of(node)
        if bound is None:
            unbound += 1
        else:
            rejected[bound] = f"identity: {why}"
    return good, rejected, unbound


def warn_without_keys(cfg) -> bool:
    """One warning line when partitions are not pinned to node keys (the
    Deployment Runtime's start, strategies/server_app.py flwr_main). True
    when it warned."""
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "server.node_keys", default=None):
        return False
    log.warning("server.node_keys is not set: each partition is bound to the first node that "
                "claims it (trust on first use); a node claiming a bound partition is refused "
                "and counted (identity_conflicts). Pin partitions to keys: docs/deploy.md")
    return True


def binding_from_cfg(cfg) -> NodeBinding:
    """The run's binding; partitions pinned to keys when ``server.node_keys`` is set."""
    from omegaconf import OmegaConf

    from regtopk_fl.settings import ConfigError

    n = int(cfg.num_workers)
    path = OmegaConf.select(cfg, "server.node_keys", default=None)
    if not path:
        return NodeBinding(n)
    try:
        return NodeBinding(n, load_node_keys(path, n))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"server.node_keys={str(path)!r}: {exc}") from None
