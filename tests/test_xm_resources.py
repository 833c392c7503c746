"""Resource types, requirements and topologies (`xm.resources`, `xm.compute_units`)."""

import re

import pytest

import xm
from xm import resources
from xm.resources import JobRequirements, ResourceType

UPSTREAM_RESOURCE_VALUES = {
    "CPU": 100002,
    "MEMORY": 39,
    "RAM": 39,
    "EPHEMERAL_STORAGE": 100003,
    "DISK": 100003,
    "LOCAL_GPU": 100006,
    "P4": 21,
    "T4": 22,
    "P100": 14,
    "V100": 17,
    "A100": 46,
    "A100_80GIB": 66,
    "TPU_V2": 3,
    "TPU_V3": 16,
}
NEW_GPUS = ["GPU", "H100", "H200", "L40S", "A10", "L4", "A40", "A6000", "RTX_3090", "RTX_4090"]


# --- ResourceType and subsets ----------------------------------------------------------


def test_upstream_values_and_aliases():
    for name, value in UPSTREAM_RESOURCE_VALUES.items():
        assert ResourceType[name].value == value
    assert ResourceType.RAM is ResourceType.MEMORY
    assert ResourceType.DISK is ResourceType.EPHEMERAL_STORAGE


def test_added_types_have_unique_values_that_do_not_clash():
    upstream_values = set(UPSTREAM_RESOURCE_VALUES.values())
    added = [m for m in ResourceType if m.name not in UPSTREAM_RESOURCE_VALUES]
    assert {m.name for m in added} >= set(NEW_GPUS)
    values = [m.value for m in added]
    assert len(set(values)) == len(values)
    assert not upstream_values & set(values)
    # No added name is an alias of another member.
    assert len(ResourceType.__members__) == len(list(ResourceType)) + 2  # RAM, DISK


def test_lookup_is_case_insensitive():
    assert ResourceType["cpu"] is ResourceType["Cpu"] is ResourceType["CPU"] is ResourceType.CPU
    assert ResourceType["ram"] is ResourceType.MEMORY
    assert ResourceType["l40s"] is ResourceType.L40S


def test_unknown_name_is_a_key_error():
    with pytest.raises(KeyError, match=re.escape("Unknown ResourceType 'foo'")):
        ResourceType["foo"]


def test_str_is_the_name():
    assert str(ResourceType.V100) == "V100"
    assert str(ResourceType.RAM) == "MEMORY"
    assert f"{ResourceType.H100}" == "H100"


def test_gpu_type_subset():
    assert xm.GpuType["V100"] is xm.GpuType(17) is ResourceType.V100
    assert xm.GpuType["v100"] is ResourceType.V100
    assert xm.GpuType.V100 is ResourceType.V100
    assert ResourceType.V100 in xm.GpuType
    assert ResourceType.TPU_V3 not in xm.GpuType
    assert ResourceType.LOCAL_GPU not in xm.GpuType
    assert None not in xm.GpuType
    for name in NEW_GPUS:
        assert ResourceType[name] in xm.GpuType
    gpus = list(xm.GpuType)
    assert gpus[:6] == [ResourceType[n] for n in ("P4", "T4", "P100", "V100", "A100", "A100_80GIB")]
    assert len(gpus) == len(set(gpus))


def test_subset_errors():
    with pytest.raises(AttributeError, match="type object 'GpuType' has no attribute 'TPU_V3'"):
        xm.GpuType["TPU_V3"]
    with pytest.raises(ValueError, match="22 is not a valid TpuType"):
        xm.TpuType(22)
    with pytest.raises(ValueError, match="170 is not a valid ResourceType"):
        xm.GpuType(170)
    with pytest.raises(KeyError, match="Unknown ResourceType 'nope'"):
        xm.GpuType["nope"]


def test_tpu_type_subset():
    assert list(xm.TpuType) == [ResourceType.TPU_V2, ResourceType.TPU_V3]
    assert ResourceType.TPU_V2 in xm.TpuType and ResourceType.V100 not in xm.TpuType
    assert xm.TpuType.TPU_V3 is ResourceType.TPU_V3


def test_service_tier():
    assert [(t.name, t.value) for t in xm.ServiceTier] == [
        ("PROD", 200),
        ("BATCH", 100),
        ("FREEBIE", 25),
    ]
    assert xm.ServiceTier["batch"] is xm.ServiceTier.BATCH
    with pytest.raises(KeyError, match="Unknown ServiceTier 'gold'"):
        xm.ServiceTier["gold"]


# --- ResourceDict --------------------------------------------------------------------


def test_resource_dict_str_is_sorted():
    resource_dict = xm.ResourceDict()
    resource_dict[ResourceType.V100] = 8
    resource_dict[ResourceType.CPU] = 4.2 * xm.vCPU
    resource_dict[ResourceType.MEMORY] = 16.5 * xm.GiB
    assert str(resource_dict) == "CPU: 4.2, MEMORY: 17716740096.0, V100: 8"
    assert str(JobRequirements(cpu=2, v100=1).task_requirements) == "CPU: 2.0, V100: 1.0"


def test_resource_dict_is_a_mutable_mapping():
    resource_dict = xm.ResourceDict()
    resource_dict[ResourceType.CPU] = 1
    assert dict(resource_dict) == {ResourceType.CPU: 1}
    assert len(resource_dict) == 1 and ResourceType.CPU in resource_dict
    del resource_dict[ResourceType.CPU]
    assert len(resource_dict) == 0
    with pytest.raises(KeyError, match=re.escape("<ResourceType.CPU: 100002>")):
        resource_dict[ResourceType.CPU]


def test_resource_dict_arithmetic():
    first = JobRequirements(cpu=1, tpu_v2="2x2")
    second = JobRequirements(ram=4 * xm.GiB, replicas=10)
    total = first.replicas * first.task_requirements + second.replicas * second.task_requirements
    assert total[ResourceType.CPU] == 1
    assert total[ResourceType.RAM] == 40 * xm.GiB
    assert total[ResourceType.TPU_V2] == 4
    doubled = first.task_requirements * 2
    assert doubled[ResourceType.CPU] == 2 and isinstance(doubled, xm.ResourceDict)


# --- Topology ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, chips, dimensions",
    [("2", 2, [2]), ("4x4", 16, [4, 4]), ("2x3x5", 30, [2, 3, 5]), ("4x4_twisted", 16, [4, 4])],
)
def test_topology_chip_count(name, chips, dimensions):
    topology = xm.Topology(name)
    assert topology.chip_count == chips
    assert topology.dimensions == dimensions
    assert topology.name == name


@pytest.mark.parametrize("name", ["euclidian", "4x4_bent", "", "x4", "2.5"])
def test_invalid_topology(name):
    with pytest.raises(
        xm.InvalidTpuTopologyError, match=re.escape(f"Invalid TPU topology: {name}.")
    ):
        xm.Topology(name)


def test_topology_repr_equality_hash():
    assert repr(xm.Topology("4x4")) == "xm.Topology('4x4')"
    assert xm.Topology("4x4") == xm.Topology("4x4")
    assert xm.Topology("2x2") != xm.Topology("4x4")
    assert hash(xm.Topology("4x4")) == hash(xm.Topology("4x4"))
    assert xm.Topology("4") != "4"


# --- JobRequirements -----------------------------------------------------------------


def test_cpu_job():
    requirements = JobRequirements(cpu=1.2, ram=1 * xm.GiB)
    assert requirements.task_requirements[ResourceType.CPU] == 1.2
    assert requirements.task_requirements[ResourceType.RAM] == 1 * xm.GiB
    assert requirements.accelerator is None
    assert requirements.topology is None
    assert requirements.replicas == 1
    assert requirements.location is None
    assert requirements.service_tier is xm.ServiceTier.PROD


def test_lxm3_style_generic_gpu():
    requirements = JobRequirements(cpu=4, ram=16 * xm.GiB, gpu=1)
    assert requirements.accelerator is ResourceType.GPU
    assert requirements.accelerator in xm.GpuType
    assert requirements.topology == xm.Topology("1")
    assert dict(requirements.task_requirements) == {
        ResourceType.CPU: 4.0,
        ResourceType.MEMORY: 16.0 * xm.GiB,
        ResourceType.GPU: 1.0,
    }


def test_quantities_are_floats():
    requirements = JobRequirements(cpu=4, memory="1024", h100=2)
    values = list(requirements.task_requirements.values())
    assert values == [4.0, 1024.0, 2.0]
    assert all(type(v) is float for v in values)
    assert requirements.topology == xm.Topology("2")


def test_mapping_and_keywords_combine():
    requirements = JobRequirements({ResourceType.CPU: 4, "memory": 2}, v100=1)
    assert requirements.task_requirements[ResourceType.CPU] == 4
    assert requirements.task_requirements[ResourceType.MEMORY] == 2
    assert requirements.accelerator is ResourceType.V100


def test_unit_suffixes_are_not_parsed():
    message = re.escape("Couldn't parse resource quantity for memory. '8GiB' was given.")
    with pytest.raises(ValueError, match=message):
        JobRequirements(memory="8GiB")


def test_bad_quantity_types():
    with pytest.raises(
        ValueError, match="Couldn't parse resource quantity for cpu. None was given."
    ):
        JobRequirements(cpu=None)
    with pytest.raises(
        ValueError, match="Couldn't parse resource quantity for v100. '2xx' was given."
    ):
        JobRequirements(v100="2xx")


def test_unknown_resource_is_a_key_error():
    with pytest.raises(KeyError, match="Unknown ResourceType 'upc'"):
        JobRequirements(cpu=0.5 * xm.vCPU, upc=2)


def test_two_accelerators_are_an_error():
    with pytest.raises(ValueError, match="^Accelerator already set.$"):
        JobRequirements(v100=1, tpu_v2="2x2")
    with pytest.raises(ValueError, match="^Accelerator already set.$"):
        JobRequirements(gpu=1, h100=1)
    with pytest.raises(ValueError, match="^Accelerator already set.$"):
        JobRequirements({"local_gpu": 1}, gpu=1)


def test_same_resource_twice_is_an_error():
    with pytest.raises(ValueError, match="^CPU has been specified twice.$"):
        JobRequirements({ResourceType.CPU: 1}, cpu=2)
    with pytest.raises(ValueError, match="^CPU has been specified twice.$"):
        JobRequirements(cpu=1, CPU=2)
    with pytest.raises(ValueError, match="^MEMORY has been specified twice.$"):
        JobRequirements(memory=1, ram=2)


def test_topology_for_a_non_accelerator_is_an_error():
    with pytest.raises(
        ValueError, match="^A topology specified for non accelerator resource CPU.$"
    ):
        JobRequirements(cpu="2x2")


def test_bad_resource_key_type():
    with pytest.raises(TypeError, match="Resource names must be strings or xm.ResourceType"):
        JobRequirements({3: 1})


def test_tpu_job():
    requirements = JobRequirements(tpu_v3="4x4")
    assert requirements.accelerator is ResourceType.TPU_V3
    assert requirements.topology.name == "4x4"
    assert requirements.task_requirements[ResourceType.TPU_V3] == 16


def test_topology_object_as_quantity():
    requirements = JobRequirements(a100=xm.Topology("2x2"))
    assert requirements.topology == xm.Topology("2x2")
    assert requirements.task_requirements[ResourceType.A100] == 4
    assert requirements.replicas == 2


def test_multihost_gpu_sets_replicas():
    requirements = JobRequirements(v100="4x2", cpu=1)
    assert requirements.accelerator is ResourceType.V100
    assert requirements.topology.name == "4x2"
    assert requirements.replicas == 2
    assert JobRequirements(replicas=2, v100="4x2").replicas == 2
    assert JobRequirements(gpu="8x4").replicas == 4


def test_multihost_gpu_with_conflicting_replicas():
    message = re.escape(
        "For multihost GPUs with topology xm.Topology('4x2'), replicas should be either None "
        "or 2. Found: 3"
    )
    with pytest.raises(ValueError, match=message):
        JobRequirements(v100="4x2", replicas=3)


def test_replicas():
    assert JobRequirements(replicas=2).replicas == 2
    assert JobRequirements(replicas=None).replicas == 1
    assert JobRequirements(v100=2, replicas=3).replicas == 3
    with pytest.raises(ValueError, match="^Replicated jobs are not supported for TPU_V3.$"):
        JobRequirements(replicas=2, tpu_v3="4x4")
    assert JobRequirements(replicas=1, tpu_v3="4x4").replicas == 1


def test_location_and_service_tier():
    requirements = JobRequirements(location="lon_r7", service_tier=xm.ServiceTier.BATCH)
    assert requirements.location == "lon_r7"
    assert requirements.service_tier is xm.ServiceTier.BATCH
    requirements.service_tier = xm.ServiceTier.FREEBIE
    assert requirements.service_tier is xm.ServiceTier.FREEBIE


def test_repr():
    assert (
        repr(JobRequirements(cpu=4, memory=8 * xm.GiB, a100=2, location="node01"))
        == "xm.JobRequirements(cpu=4.0, memory=8589934592.0, a100=2.0, location='node01')"
    )
    assert repr(
        JobRequirements(cpu=1, location="lon_r7", service_tier=xm.ServiceTier.BATCH, replicas=2)
    ) == (
        "xm.JobRequirements(cpu=1.0, location='lon_r7', service_tier=xm.ServiceTier.BATCH, "
        "replicas=2)"
    )
    assert repr(JobRequirements(cpu=1)) == "xm.JobRequirements(cpu=1.0)"
    assert repr(JobRequirements(tpu_v2="2x2")) == "xm.JobRequirements(tpu_v2=xm.Topology('2x2'))"
    assert repr(JobRequirements()) == "xm.JobRequirements()"


def test_accelerator_membership_helpers():
    assert JobRequirements(cpu=1).accelerator not in xm.GpuType
    assert JobRequirements(cpu=1, v100=4).accelerator in xm.GpuType
    assert JobRequirements(cpu=1, v100=4).accelerator not in xm.TpuType
    assert JobRequirements(tpu_v2="2x2").accelerator in xm.TpuType


def test_default_resources_mapping_is_immutable():
    default = JobRequirements.__init__.__defaults__[0]
    with pytest.raises(TypeError, match="'mappingproxy' object does not support item assignment"):
        default["cpu"] = 1
    assert resources._NO_RESOURCES == {}


# --- Compute units -----------------------------------------------------------------


def test_compute_units():
    assert xm.vCPU == 1.0
    assert [xm.KiB, xm.MiB, xm.GiB, xm.TiB, xm.PiB] == [2**10, 2**20, 2**30, 2**40, 2**50]
    assert [xm.KB, xm.MB, xm.GB, xm.TB, xm.PB] == [10**3, 10**6, 10**9, 10**12, 10**15]
    assert (xm.Sec, xm.Min, xm.Hr) == (1, 60, 3600)
