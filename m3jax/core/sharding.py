"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

The mesh has three named axes sized from the config (`config.mesh` -> MeshSettings, -1 = the remaining devices):
  data    pure data parallelism (params replicated along it)
  fsdp    data parallelism with params / optimizer state sharded along it (ZeRO-3 style)
  tensor  tensor parallelism over heads / mlp / vocab
Everything shards by logical axis names through the rules in `config.sharding_rules`: the batch by the rule for
"batch" (default: data and fsdp), params by the names their modules give them; a dimension that the mesh axis does
not divide is replicated instead (logged), e.g. the 250002-token vocabulary.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """config.mesh's axis sizes (-1: the remaining devices) and config.sharding_rules (m3jax.config.mesh_settings)."""

    data: int
    fsdp: int
    tensor: int
    sharding_rules: tuple  # (logical axis name, None | mesh axis | tuple of mesh axes) pairs

    @property
    def mesh(self) -> dict[str, int]:
        """The axis sizes as config.mesh holds them."""
        return {a: getattr(self, a) for a in MESH_AXES}


def mesh_shape(settings: MeshSettings, num_devices: int) -> tuple[int, ...]:
    sizes = [int(getattr(settings, a)) for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh={settings.mesh}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh={settings.mesh} needs {math.prod(sizes)} devices, there are {num_devices}")
    return tuple(sizes)


def make_mesh(settings: MeshSettings, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh. A single-process run whose axis sizes are all explicit may use fewer devices
    than it has (the first ones); a multi-process mesh must span every device."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(getattr(settings, a)) for a in MESH_AXES]
    if -1 not in sizes and math.prod(sizes) < len(devices) and jax.process_count() == 1:
        logger.warning("config.mesh=%s uses %d of the %d devices", settings.mesh, math.prod(sizes), len(devices))
        devices = devices[:math.prod(sizes)]
    shape = mesh_shape(settings, len(devices))
    try:  # topology-aware order on TPU / multi-host; process-contiguous batch slices
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rule_axes(rules, name: str) -> tuple[str, ...] | None:
    """The mesh axes of a logical axis name by the rules (() = replicated), None if no rule names it."""
    for rule_name, axes in rules:
        if rule_name == name:
            if axes is None:
                return ()
            return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return None


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the batch dimension shards over: the rule for the logical axis "batch"."""
    axes = rule_axes(rules, "batch")
    if axes is None:
        raise ValueError('config.sharding_rules: no rule for "batch" (e.g. ("batch", ("data", "fsdp")))')
    return axes


_TRACING_RULES: contextvars.ContextVar[tuple] = contextvars.ContextVar("m3jax_sharding_rules", default=())


@contextlib.contextmanager
def tracing_context(mesh: Mesh, rules):
    """While a sharded computation is traced: the abstract mesh and the logical rules, which model code reads (with
    `current_rules`) to run Pallas kernels per shard (m3jax.model.attention's flash-dropout and splash)."""
    token = _TRACING_RULES.set(tuple(tuple(r) for r in rules))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _TRACING_RULES.reset(token)


def current_rules() -> tuple:
    """The logical rules of the enclosing tracing_context (empty outside one)."""
    return _TRACING_RULES.get()


def rows_over_batch_axes(tree):
    """Each array's first (row) dimension sharded over the mesh axes of the logical rule "batch" (its other
    dimensions left to the partitioner), inside a sharded trace (`tracing_context`); as is elsewhere.

    Activations need it where the partitioner would otherwise choose for itself: for a small chunk of rows (the
    gradient cache's) the TPU partitioner gathered all devices' rows and sharded the hidden dimension like the
    fsdp-sharded embedding table, so every chip encoded the whole chunk."""
    axes = rule_axes(current_rules(), "batch")
    if jax.sharding.get_abstract_mesh().empty or not axes:
        return tree
    free = PartitionSpec.UNCONSTRAINED
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *(free,) * (x.ndim - 1))), tree)


def num_batch_shards(mesh: Mesh, rules) -> int:
    """Devices the batch is split over (W): each holds one block of queries and their passages."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, name: str) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (replicate that dimension instead)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % size:
            logger.info("sharding: %s dim %d is not divisible by mesh %s=%d; replicated", name, dim, axes, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays, by the logical rules."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, [tuple(r) for r in rules])
    unboxed = nn.unbox(abstract_boxed_tree)

    def to_sharding(path, spec, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(to_sharding, mesh_specs, unboxed,
                                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings_like(abstract_state, abstract_params, param_shardings, mesh: Mesh):
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path and has its shape
    (Adam's mu / nu, ...) takes that parameter's sharding; everything else (counts) is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(param_shardings)):
        by_path[tuple(str(k) for k in path)] = (leaf.shape, sharding)

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            shape, sharding = by_path.get(keys[i:], (None, None))
            if sharding is not None and shape == leaf.shape:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def put_tree(np_tree, shardings):
    """Host numpy arrays (identical on every process) -> global jax arrays with the given shardings."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, np_tree, shardings)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays with the batch sharding (no host sync)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(tree):
    """Host float32 numpy copies of a tree of (possibly sharded) arrays; arrays spread over several processes are
    all-gathered first (a collective: every process must call this)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.array(x, dtype=np.float32)  # a writable copy (torch.from_numpy warns on read-only arrays)

    return jax.tree.map(get, tree)
