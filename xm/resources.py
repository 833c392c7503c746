"""Resource requirements of jobs: CPUs, memory, accelerators and topologies."""

from __future__ import annotations

import enum
import functools
import itertools
import operator
import re
import types
from collections.abc import MutableMapping

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import (
        Any,
        Dict,
        FrozenSet,
        Iterable,
        Iterator,
        List,
        Mapping,
        Optional,
        Tuple,
        Union,
    )

    ResourceQuantity = Union[int, float, str, "Topology"]


def __getattr__(name: str) -> Any:
    """Creates the `ResourceQuantity` alias on first use (`typing` is slow to load)."""
    if name != "ResourceQuantity":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from typing import Union

    global ResourceQuantity
    ResourceQuantity = Union[int, float, str, Topology]
    return ResourceQuantity


def __dir__() -> List[str]:
    return sorted({*globals(), "ResourceQuantity"})


class _CaseInsensitiveEnumMeta(enum.EnumMeta):
    """Lets `ResourceType['ram']` find `RAM`: flags and kwargs are lower case."""

    def __getitem__(cls, name: str) -> Any:
        try:
            return super().__getitem__(name.upper())
        except (KeyError, AttributeError):
            raise KeyError(f"Unknown {cls.__name__} {name!r}") from None


class ResourceType(enum.Enum, metaclass=_CaseInsensitiveEnumMeta):
    """A countable resource: CPU, memory, disk or a particular accelerator.

    Every accelerator model is its own type, so a job's requirements are a
    plain mapping from type to amount. Values up to `A100_80GIB` are
    XManager's; lxm3 adds a generic `GPU` and current models (values from
    200000 on, so they cannot clash with XManager's).
    """

    # Amount of CPU in vCPUs.
    CPU = 100002
    # Amount of memory in bytes.
    MEMORY = 39
    RAM = 39
    # Amount of disk in bytes.
    EPHEMERAL_STORAGE = 100003
    DISK = 100003

    # GPUs.
    LOCAL_GPU = 100006
    P4 = 21
    T4 = 22
    P100 = 14
    V100 = 17
    A100 = 46
    A100_80GIB = 66

    # TPUs.
    TPU_V2 = 3
    TPU_V3 = 16

    # lxm3 additions: any GPU the scheduler picks, then specific models.
    GPU = 200000
    A10 = 200001
    A10G = 200002
    A30 = 200003
    A40 = 200004
    A5000 = 200005
    A6000 = 200006
    L4 = 200007
    L40 = 200008
    L40S = 200009
    H100 = 200010
    H200 = 200011
    B200 = 200012
    RTX_2080TI = 200013
    RTX_3090 = 200014
    RTX_4090 = 200015

    def __str__(self) -> str:
        return self._name_


class ServiceTier(enum.Enum, metaclass=_CaseInsensitiveEnumMeta):
    """Availability guarantee to ask the platform for.

    PROD is scheduled fast; BATCH is cheaper, may wait and be preempted;
    FREEBIE is the cheapest, without guarantees.
    """

    PROD = 200
    BATCH = 100
    FREEBIE = 25


class _EnumSubsetMeta(type):
    """Makes a class behave like a sub-enum of `ResourceType`.

    Its members *are* `ResourceType` members (so comparisons work), it
    supports `in`, iteration, `Sub['name']` and `Sub(value)`.
    """

    _members: FrozenSet[ResourceType]
    _ordered: Tuple[ResourceType, ...]

    def __getitem__(cls, name: str) -> ResourceType:
        result = ResourceType[name]
        if result not in cls._members:
            raise AttributeError(f"type object '{cls.__name__}' has no attribute '{name}'")
        return result

    def __iter__(cls) -> Iterator[ResourceType]:
        return iter(cls._ordered)

    def __len__(cls) -> int:
        return len(cls._ordered)

    def __contains__(cls, value: object) -> bool:
        return value in cls._members

    def __call__(cls, value: int) -> ResourceType:
        resource = ResourceType(value)
        if resource not in cls._members:
            raise ValueError(f"{value} is not a valid {cls.__name__}")
        return resource

    def contains(cls, value: object) -> bool:
        return value in cls._members

    def __repr__(cls) -> str:
        return f"<enum subset '{cls.__name__}'>"


def _enum_subset(class_name: str, values: Iterable[ResourceType]) -> type:
    """Creates a subset of `ResourceType` named `class_name`."""
    ordered = tuple(dict.fromkeys(values))
    members = frozenset(ordered)
    namespace: Dict[str, Any] = {
        name: member for name, member in ResourceType.__members__.items() if member in members
    }
    namespace.update(_members=members, _ordered=ordered, __module__=__name__)
    return _EnumSubsetMeta(class_name, (), namespace)


TpuType = _enum_subset("TpuType", [ResourceType.TPU_V2, ResourceType.TPU_V3])

GpuType = _enum_subset(
    "GpuType",
    [
        # LOCAL_GPU is not listed: it names a device, not a GPU model.
        ResourceType.P4,
        ResourceType.T4,
        ResourceType.P100,
        ResourceType.V100,
        ResourceType.A100,
        ResourceType.A100_80GIB,
        ResourceType.GPU,
        ResourceType.A10,
        ResourceType.A10G,
        ResourceType.A30,
        ResourceType.A40,
        ResourceType.A5000,
        ResourceType.A6000,
        ResourceType.L4,
        ResourceType.L40,
        ResourceType.L40S,
        ResourceType.H100,
        ResourceType.H200,
        ResourceType.B200,
        ResourceType.RTX_2080TI,
        ResourceType.RTX_3090,
        ResourceType.RTX_4090,
    ],
)

_AcceleratorType = _enum_subset("_AcceleratorType", [ResourceType.LOCAL_GPU, *TpuType, *GpuType])


class ResourceDict(MutableMapping):
    """Amounts of resources by `ResourceType`, e.g. a task's requirements.

    Supports `+` (per-resource sum) and multiplication by a scalar, which is
    handy for totals: `replicas * requirements.task_requirements`.
    """

    def __init__(self) -> None:
        self.__dict: Dict[ResourceType, float] = {}

    def __setitem__(self, key: ResourceType, value: float) -> None:
        self.__dict[key] = value

    def __getitem__(self, key: ResourceType) -> float:
        return self.__dict[key]

    def __delitem__(self, key: ResourceType) -> None:
        del self.__dict[key]

    def __iter__(self) -> Iterator[ResourceType]:
        return iter(self.__dict)

    def __len__(self) -> int:
        return len(self.__dict)

    def __str__(self) -> str:
        """E.g. 'CPU: 2.0, MEMORY: 1073741824.0, V100: 1.0' (sorted)."""
        return ", ".join(sorted(f"{key}: {value}" for key, value in self.items()))

    def __add__(self, rhs: ResourceDict) -> ResourceDict:
        result = ResourceDict()
        for key in [*self.keys(), *rhs.keys()]:
            result[key] = self.get(key, 0) + rhs.get(key, 0)
        return result

    def __mul__(self, rhs: float) -> ResourceDict:
        result = ResourceDict()
        for key, value in self.items():
            result[key] = value * rhs
        return result

    def __rmul__(self, rhs: float) -> ResourceDict:
        return self * rhs


class InvalidTpuTopologyError(Exception):
    """The topology string is not of the form `NxM..._suffix`."""


class Topology:
    """How accelerators are interconnected: `'4'` (4 on a host), `'4x4'`, ...

    The name is dimensions joined by `x`, optionally followed by `_twisted`
    or `_untwisted`.
    """

    def __init__(self, name: str) -> None:
        if not re.fullmatch(r"([\d]+x?)+(_(un)?twisted)?", name):
            raise InvalidTpuTopologyError(f"Invalid TPU topology: {name}.")
        self._name = name
        self.dimensions = [int(d) for d in name.split("_")[0].split("x") if d]

    @property
    def chip_count(self) -> int:
        """The number of chips: the product of the dimensions."""
        return functools.reduce(operator.mul, self.dimensions)

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"xm.Topology({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)


def _parse_resource_quantity(
    resource_name: Any, value: ResourceQuantity
) -> Tuple[float, Optional[Topology]]:
    """Returns the amount and, for `'NxM'` strings or Topologies, the topology."""
    try:
        if isinstance(value, str):
            if "x" in value:
                topology = Topology(value)
                return topology.chip_count, topology
            # No unit suffixes: write `8 * xm.GiB`, not '8GiB'.
            return float(value), None
        if isinstance(value, Topology):
            return value.chip_count, value
        return float(value), None
    except Exception as e:
        raise ValueError(
            f"Couldn't parse resource quantity for {resource_name}. {value!r} was given."
        ) from e


def _resource_type(resource_name: Union[ResourceType, str]) -> ResourceType:
    if isinstance(resource_name, ResourceType):
        return resource_name
    if isinstance(resource_name, str):
        return ResourceType[resource_name]
    raise TypeError(f"Resource names must be strings or xm.ResourceType, got {resource_name!r}")


_NO_RESOURCES: Mapping[Any, Any] = types.MappingProxyType({})


class JobRequirements:
    """The resources a job needs, and where and how to run it.

    Attributes:
      task_requirements: resources needed by each task (replica) of the job.
      accelerator: the accelerator type used, if any. At most one: different
        accelerators are rarely installed on the same host.
      topology: the accelerator topology, if an accelerator is used.
      location: where to run, e.g. a cluster or partition name.
      service_tier: the availability tier to run at.
      replicas: the number of identical tasks in the job.
    """

    task_requirements: ResourceDict
    accelerator: Optional[ResourceType]
    topology: Optional[Topology]
    location: Optional[str]
    replicas: int

    def __init__(
        self,
        resources: Mapping[Union[ResourceType, str], ResourceQuantity] = _NO_RESOURCES,
        *,
        location: Optional[str] = None,
        replicas: Optional[int] = None,
        service_tier: Optional[ServiceTier] = None,
        **kw_resources: ResourceQuantity,
    ) -> None:
        """Collects requirements given as a mapping and/or keyword arguments.

        For example `JobRequirements({xm.ResourceType.V100: 2}, cpu=8)` or
        `JobRequirements(cpu=4, ram=16 * xm.GiB, gpu=1)`. Names are
        case-insensitive; amounts are numbers (or numeric strings), and an
        accelerator may be given a topology such as `'2x2'`.

        Raises:
          ValueError: two accelerators are given; a resource is given twice;
            an amount cannot be parsed; a topology is given for something
            that is not an accelerator; `replicas` conflicts with a 2-D GPU
            topology or is used with a TPU.
          KeyError: a resource name is unknown.
        """
        self.location = location
        self._service_tier = service_tier or ServiceTier.PROD
        self.task_requirements = ResourceDict()
        self.accelerator = None
        self.topology = None
        self.replicas = 1

        for resource_name, value in itertools.chain(resources.items(), kw_resources.items()):
            self._add_resource(resource_name, value)

        if (
            self.accelerator in GpuType
            and self.topology is not None
            and len(self.topology.dimensions) == 2
        ):
            hosts = self.topology.dimensions[1]
            if replicas is not None and replicas != hosts:
                raise ValueError(
                    f"For multihost GPUs with topology {self.topology}, replicas should "
                    f"be either None or {hosts}. Found: {replicas}"
                )
            replicas = hosts

        self.replicas = replicas or 1
        self._validate_replicas()

    def _add_resource(self, resource_name: Union[ResourceType, str], value: Any) -> None:
        scalar, topology = _parse_resource_quantity(resource_name, value)
        resource = _resource_type(resource_name)
        if resource in _AcceleratorType:
            if self.accelerator is not None:
                raise ValueError("Accelerator already set.")
            self.accelerator = resource
            self.topology = topology or Topology(f"{scalar:g}")
        elif topology is not None:
            raise ValueError(f"A topology specified for non accelerator resource {resource}.")
        if resource in self.task_requirements:
            raise ValueError(f"{resource} has been specified twice.")
        self.task_requirements[resource] = scalar

    @property
    def service_tier(self) -> ServiceTier:
        return self._service_tier

    @service_tier.setter
    def service_tier(self, new_service_tier: ServiceTier) -> None:
        self._service_tier = new_service_tier

    def _validate_replicas(self) -> None:
        """TPU jobs cannot be replicated."""
        if self.replicas > 1 and self.accelerator in TpuType:
            raise ValueError(f"Replicated jobs are not supported for {self.accelerator}.")

    def __repr__(self) -> str:
        args = []
        for resource, value in self.task_requirements.items():
            if resource in TpuType:
                args.append(f"{resource.name.lower()}={self.topology!r}")
            else:
                args.append(f"{resource.name.lower()}={value!r}")
        if self.location:
            args.append(f"location={self.location!r}")
        if self.service_tier != ServiceTier.PROD:
            args.append(f"service_tier=xm.{self.service_tier}")
        if self.replicas != 1:
            args.append(f"replicas={self.replicas}")
        return f"xm.JobRequirements({', '.join(args)})"
