using DmaBroker.Core.Devices;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>SPEC §2: group formation from the embedded default topology and from topology files, and hotplug.</summary>
public sealed class GroupFormationTests
{
    /// <summary>SPEC §2's table: every function of the default topology and its group id (address order from 0).</summary>
    public static TheoryData<string, uint> DefaultGroups => new()
    {
        { "0000:00:00.0", 0 },  // host bridge
        { "0000:00:01.0", 1 },  // root ports, ACS: one each
        { "0000:00:02.0", 2 },
        { "0000:00:03.0", 3 },
        { "0000:00:04.0", 4 },
        { "0000:00:05.0", 5 },
        { "0000:00:06.0", 6 },
        { "0000:00:07.0", 7 },
        { "0000:00:08.0", 8 },
        { "0000:01:00.0", 9 },  // NVMe SSD
        { "0000:02:00.0", 10 }, // dual-port NIC without ACS between functions: one group
        { "0000:02:00.1", 10 },
        { "0000:03:00.0", 11 }, // GPU + audio function without ACS: one group
        { "0000:03:00.1", 11 },
        { "0000:04:00.0", 12 }, // switch upstream port
        { "0000:05:00.0", 13 }, // switch downstream ports without ACS, and everything below them
        { "0000:05:01.0", 13 },
        { "0000:06:00.0", 13 },
        { "0000:07:00.0", 13 },
        { "0000:08:00.0", 14 }, // edu devices under ACS root ports: one each
        { "0000:09:00.0", 15 },
        { "0000:0a:00.0", 16 },
        { "0000:0b:00.0", 17 },
    };

    /// <summary>Boot ownership: DMA-API drivers (nvme, ixgbe) own their groups; pcieport and vfio-pci take nothing.</summary>
    public static TheoryData<uint, OwnerKind, int> DefaultBootOwnership => new()
    {
        { 0, OwnerKind.None, 0 },
        { 1, OwnerKind.None, 0 },
        { 8, OwnerKind.None, 0 },
        { 9, OwnerKind.Kernel, 1 },
        { 10, OwnerKind.Kernel, 2 },
        { 11, OwnerKind.None, 0 },
        { 12, OwnerKind.None, 0 },
        { 13, OwnerKind.None, 0 },
        { 14, OwnerKind.None, 0 },
        { 15, OwnerKind.None, 0 },
        { 16, OwnerKind.None, 0 },
        { 17, OwnerKind.None, 0 },
    };

    [Theory]
    [MemberData(nameof(DefaultGroups))]
    public void Default_Function_IsInSpecGroup(string address, uint group)
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        Assert.Equal(group, table.GetDevice(PciAddress.Parse(address)).Group.Id);
    }

    [Fact]
    public void Default_Groups_HoldExactlySpecMembers()
    {
        var snapshot = new OwnershipTable(TopologyDocument.Default()).Journal.Current;
        var expected = DefaultGroups
            .GroupBy(row => (uint)row[1], row => (string)row[0])
            .ToDictionary(g => g.Key, g => string.Join(' ', g));

        Assert.Equal(expected.Keys.Order(), snapshot.Groups.Keys);
        foreach (var (id, group) in snapshot.Groups)
            Assert.Equal(expected[id], string.Join(' ', group.Devices));
        Assert.Equal(DefaultGroups.Count, snapshot.Devices.Count);
    }

    [Theory]
    [MemberData(nameof(DefaultBootOwnership))]
    public void Default_Group_HasSpecBootOwnership(uint id, OwnerKind kind, int count)
    {
        var group = new OwnershipTable(TopologyDocument.Default()).Journal.Current.Groups[id];

        Assert.Equal(kind, group.OwnerKind);
        Assert.Equal(count, group.OwnerCount);
        Assert.Equal(DomainKind.Default, group.Domain);
        Assert.Equal(0ul, group.OwnerSession);
        Assert.Equal(0ul, group.Generation);
    }

    [Theory]
    [InlineData("0000:01:00.0", "nvme", false)]
    [InlineData("0000:02:00.0", "ixgbe", false)]
    [InlineData("0000:02:00.1", "ixgbe", false)]
    [InlineData("0000:03:00.0", "vfio-pci", true)]
    [InlineData("0000:03:00.1", null, false)]
    [InlineData("0000:00:00.0", null, false)]
    [InlineData("0000:00:04.0", "pcieport", true)]
    [InlineData("0000:05:01.0", "pcieport", true)]
    [InlineData("0000:06:00.0", "vfio-pci", true)]
    [InlineData("0000:07:00.0", null, false)]
    [InlineData("0000:0b:00.0", "vfio-pci", true)]
    public void Default_Device_HasSpecBootDriver(string address, string? driver, bool managesDma)
    {
        var device = new OwnershipTable(TopologyDocument.Default()).Journal.Current.Devices[PciAddress.Parse(address)];

        Assert.Equal(driver, device.Driver);
        Assert.Equal(managesDma, device.DriverManagedDma);
    }

    [Fact]
    public void Default_Device_HasSpecIdentity()
    {
        var devices = new OwnershipTable(TopologyDocument.Default()).Journal.Current.Devices;

        Assert.Equal((0x144d, 0xa808, "nvme"), Identity(devices[PciAddress.Parse("0000:01:00.0")]));
        Assert.Equal((0x10de, 0x1eb8, "gpu"), Identity(devices[PciAddress.Parse("0000:03:00.0")]));
        Assert.Equal((0x10de, 0x10f8, "audio"), Identity(devices[PciAddress.Parse("0000:03:00.1")]));
        Assert.Equal((0x1234, 0x11e8, "edu"), Identity(devices[PciAddress.Parse("0000:06:00.0")]));
        Assert.Equal((0x8086, 0x7c97, "bridge"), Identity(devices[PciAddress.Parse("0000:00:08.0")]));

        static (int, int, string) Identity(DeviceInfo d) => (d.VendorId, d.DeviceId, d.Model);
    }

    [Fact]
    public void Default_BuiltTwice_AssignsSameGroups()
    {
        var first = new OwnershipTable(TopologyDocument.Default()).Journal.Current;
        var second = new OwnershipTable(TopologyDocument.Default()).Journal.Current;

        Assert.Equal(first.Groups.Values.Select(CoreState.Describe), second.Groups.Values.Select(CoreState.Describe));
    }

    // --- topology files ---

    [Fact]
    public void Parse_PinnedGroupIds_AreKeptAndSkippedByAutomaticIds()
    {
        var topology = CoreState.ParseTopology("""
            {
              "devices": [
                { "address": "0000:00:00.0", "kind": "host-bridge", "vendorId": "8086", "deviceId": "29c0", "classCode": "060000" },
                { "address": "0000:00:01.0", "kind": "root-port", "acs": true, "secondaryBus": "01", "vendorId": "8086", "deviceId": "7c90", "classCode": "060400", "group": 1 },
                { "address": "0000:00:02.0", "kind": "root-port", "acs": true, "secondaryBus": "02", "vendorId": "8086", "deviceId": "7c91", "classCode": "060400" },
                { "address": "0000:01:00.0", "acs": true, "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu", "group": 7 },
                { "address": "0000:02:00.0", "acs": true, "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu", "group": 7, "driver": "vfio-pci" }
              ]
            }
            """);

        var snapshot = new OwnershipTable(topology).Journal.Current;

        Assert.Equal([0u, 1u, 2u, 7u], snapshot.Groups.Keys);
        Assert.Equal("0000:00:00.0", string.Join(' ', snapshot.Groups[0].Devices));
        Assert.Equal("0000:00:01.0", string.Join(' ', snapshot.Groups[1].Devices));
        Assert.Equal("0000:00:02.0", string.Join(' ', snapshot.Groups[2].Devices));
        Assert.Equal("0000:01:00.0 0000:02:00.0", string.Join(' ', snapshot.Groups[7].Devices));
        Assert.Equal(PciNodeKind.Endpoint, topology.Functions[^1].Kind);
        Assert.Equal("vfio-pci", topology.Functions[^1].Driver);
    }

    [Fact]
    public void Load_TopologyFile_ReadsItLikeParse()
    {
        var path = Path.Combine(Path.GetTempPath(), $"dmabroker-topology-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, """
            // comments and trailing commas are allowed
            { "devices": [ { "address": "00:03.0", "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu", }, ] }
            """);
        try
        {
            var topology = TopologyDocument.Load(path);

            var only = Assert.Single(topology.Functions);
            Assert.Equal(PciAddress.Parse("0000:00:03.0"), only.Address);
            Assert.Equal(0u, Assert.Single(new OwnershipTable(topology).Journal.Current.Groups.Keys));
        }
        finally
        {
            File.Delete(path);
        }
    }

    public static TheoryData<string, string> BadFiles => new()
    {
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3" }, { "address": "0000:00:01.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: device 0000:00:01.0 listed twice"
        },
        {
            """{ "devices": [ { "address": "0000:00:1g.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: devices[0]: bad address '0000:00:1g.0' (expected DDDD:BB:DD.F)"
        },
        {
            """{ "devices": [ { "address": "0000:00:00.8", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: devices[0]: bad address '0000:00:00.8' (expected DDDD:BB:DD.F)"
        },
        {
            """{ "devices": [ { "address": "0000:05:00.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: device 0000:05:00.0: no bridge leads to bus 05"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "kind": "root-port", "vendorId": "1", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: bridge 0000:00:01.0 needs \"secondaryBus\""
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "kind": "root-complex", "vendorId": "1", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: device 0000:00:01.0: unknown kind 'root-complex'"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "12345", "deviceId": "2", "classCode": "3" } ] }""",
            "bad.json: device 0000:00:01.0: \"vendorId\" must be hex up to ffff, got '12345'"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3", "driver": "Bad Driver" } ] }""",
            "bad.json: device 0000:00:01.0: bad driver name 'Bad Driver'"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "nvme", "vendorId": "1", "deviceId": "2", "classCode": "3", "namespaceMb": 0 } ] }""",
            "bad.json: device 0000:00:01.0: \"namespaceMb\" must be 1 to 1048576, got 0"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "nvme", "vendorId": "1", "deviceId": "2", "classCode": "3", "namespaceMb": 1048577 } ] }""",
            "bad.json: device 0000:00:01.0: \"namespaceMb\" must be 1 to 1048576, got 1048577"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3", "namespaceMb": 64 } ] }""",
            "bad.json: device 0000:00:01.0: \"namespaceMb\" applies to model nvme only, not 'edu'"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "nvme", "vendorId": "1", "deviceId": "2", "classCode": "3", "namespaceMb": -1 } ] }""",
            "bad.json: not valid topology JSON"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3", "dmaLatencyUs": 0 } ] }""",
            "bad.json: device 0000:00:01.0: \"dmaLatencyUs\" must be 1 to 1000000, got 0"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "1", "deviceId": "2", "classCode": "3", "dmaLatencyUs": 1000001 } ] }""",
            "bad.json: device 0000:00:01.0: \"dmaLatencyUs\" must be 1 to 1000000, got 1000001"
        },
        {
            """{ "devices": [ { "address": "0000:00:01.0", "model": "nvme", "vendorId": "1", "deviceId": "2", "classCode": "3", "dmaLatencyUs": 100 } ] }""",
            "bad.json: device 0000:00:01.0: \"dmaLatencyUs\" applies to model edu only, not 'nvme'"
        },
        { """{ "devices": [] }""", "bad.json: no \"devices\" listed" },
        { """{ "devices": [ { "adress": "0000:00:01.0" } ] }""", "bad.json: not valid topology JSON" },
        { "not json", "bad.json: not valid topology JSON" },
    };

    [Theory]
    [InlineData(", \"namespaceMb\": 1", 1u)]
    [InlineData(", \"namespaceMb\": 1048576", 1048576u)]
    [InlineData("", 64u)]
    public void Parse_NvmeNamespaceMb_SizesTheModelsNamespace(string setting, uint mb)
    {
        var json = $$"""{ "devices": [ { "address": "0000:00:01.0", "model": "nvme", "vendorId": "144d", "deviceId": "a808", "classCode": "010802"{{setting}} } ] }""";

        var spec = Assert.Single(CoreState.ParseTopology(json).Functions);

        Assert.Equal(mb, spec.NamespaceMb);
        Assert.Equal((ulong)mb << 11, new NvmeController(spec).Namespace.Blocks);
    }

    [Theory]
    [InlineData(", \"dmaLatencyUs\": 1", 1u)]
    [InlineData(", \"dmaLatencyUs\": 100000", 100_000u)] // QEMU's 100 ms
    [InlineData("", 200u)]
    public void Parse_EduDmaLatencyUs_TimesTheModelsDma(string setting, uint us)
    {
        var json = $$"""{ "devices": [ { "address": "0000:00:01.0", "model": "edu", "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00"{{setting}} } ] }""";

        var spec = Assert.Single(CoreState.ParseTopology(json).Functions);

        Assert.Equal(us, spec.DmaLatencyUs);
        Assert.Equal(TimeSpan.FromMicroseconds(us), new EduDevice(spec, TimeProvider.System).DmaLatency);
    }

    [Fact]
    public void DefaultTopology_Nvme_Has64MiBNamespace()
    {
        var nvme = TopologyDocument.Default().Functions.Single(f => f.Address == PciAddress.Parse("0000:01:00.0"));

        Assert.Equal(("nvme", 64u), (nvme.Model, nvme.NamespaceMb));
    }

    [Theory]
    [MemberData(nameof(BadFiles))]
    public void Parse_BadFile_ThrowsTopologyExceptionSayingWhy(string json, string message)
    {
        var e = Assert.Throws<TopologyException>(() => CoreState.ParseTopology(json, "bad.json"));

        Assert.Contains(message, e.Message, StringComparison.Ordinal);
    }

    // --- hotplug ---

    private static PciFunctionSpec Endpoint(string address, bool acs, string? driver = null, string model = "edu") =>
        new(PciAddress.Parse(address), PciNodeKind.Endpoint, 0x1234, 0x11e8, 0x00ff00, model, acs, null, driver, null);

    [Fact]
    public void AddDevice_FunctionWithoutAcsBesideNonAcsSiblings_JoinsTheirGroup()
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        var info = table.AddDevice(Endpoint("0000:02:00.2", acs: false, driver: "ixgbe", model: "nic"));

        Assert.Equal(10u, info.GroupId);
        var group = table.Journal.Current.Groups[10];
        Assert.Equal("0000:02:00.0 0000:02:00.1 0000:02:00.2", string.Join(' ', group.Devices));
        Assert.Equal((OwnerKind.Kernel, 3), (group.OwnerKind, group.OwnerCount));
    }

    [Theory]
    [InlineData("0000:06:00.1", true)]
    [InlineData("0000:07:01.0", false)]
    public void AddDevice_BelowNonAcsSwitchPort_JoinsSwitchGroup(string address, bool acs)
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        var info = table.AddDevice(Endpoint(address, acs, driver: "vfio-pci"));

        Assert.Equal(13u, info.GroupId);
        Assert.Equal(5, table.Journal.Current.Groups[13].Devices.Length);
        Assert.Equal(OwnerKind.None, table.Journal.Current.Groups[13].OwnerKind);
    }

    [Theory]
    [InlineData("0000:08:00.1", false)]
    [InlineData("0000:09:00.1", true)]
    [InlineData("0000:00:1f.0", true)]
    public void AddDevice_NoGroupToJoin_GetsNewGroup(string address, bool acs)
    {
        var table = new OwnershipTable(TopologyDocument.Default());
        var revision = table.Journal.Current.Revision;

        var info = table.AddDevice(Endpoint(address, acs, driver: "nvme"));

        Assert.Equal(18u, info.GroupId);
        var group = table.Journal.Current.Groups[18];
        Assert.Equal(address, string.Join(' ', group.Devices));
        Assert.Equal((OwnerKind.Kernel, 1, DomainKind.Default), (group.OwnerKind, group.OwnerCount, group.Domain));
        Assert.Equal(revision + 2, table.Journal.Current.Revision);
    }

    [Fact]
    public async Task AddDevice_DmaApiDriverIntoUserOwnedGroup_FailsEbusyAndAddsNothing()
    {
        await using var broker = NewBroker();
        var session = broker.Sessions.Open();
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        broker.Vfio.SetContainer(session, 13, container.Id);

        CoreState.AssertRejected(broker, Errno.EBUSY, () => broker.Table.AddDevice(Endpoint("0000:06:00.1", acs: true, driver: "ixgbe")));

        Assert.Equal(Errno.ENODEV, CoreState.ErrnoOf(() => broker.Table.GetDevice(PciAddress.Parse("0000:06:00.1"))));
        Assert.Equal(4, CoreState.Group(broker, 13).Devices.Length);
        CoreState.AssertInvariants(broker);
    }

    [Fact]
    public async Task AddDevice_IntoUserOwnedGroup_JoinsCurrentDomainAndLaterDmaApiBindFailsEbusy()
    {
        await using var broker = NewBroker();
        var session = broker.Sessions.Open();
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        broker.Vfio.SetContainer(session, 13, container.Id);
        var added = PciAddress.Parse("0000:07:00.1");

        broker.Table.AddDevice(Endpoint("0000:07:00.1", acs: false));

        var group = CoreState.Group(broker, 13);
        Assert.Contains(added, group.Devices);
        Assert.Equal((OwnerKind.User, 1, session.Id, DomainKind.User), (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Domain));
        CoreState.AssertRejected(broker, Errno.EBUSY, () => broker.Table.BindDriver(added, "ixgbe"));
        broker.Table.BindDriver(added, "vfio-pci");
        CoreState.AssertInvariants(broker);
    }

    [Fact]
    public void AddDevice_ExistingAddress_FailsEexist()
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        var e = Assert.Throws<ErrnoException>(() => table.AddDevice(Endpoint("0000:08:00.0", acs: true)));

        Assert.Equal(Errno.EEXIST, e.Errno);
    }

    [Fact]
    public void AddDevice_BusWithoutBridge_FailsEnodevAndAddsNothing()
    {
        var table = new OwnershipTable(TopologyDocument.Default());
        var revision = table.Journal.Current.Revision;

        var e = Assert.Throws<ErrnoException>(() => table.AddDevice(Endpoint("0000:20:00.0", acs: true)));

        Assert.Equal(Errno.ENODEV, e.Errno);
        Assert.Equal(revision, table.Journal.Current.Revision);
        Assert.Equal(18, table.Journal.Current.Groups.Count);
    }

    [Fact]
    public void AddDevice_Bridge_FailsEinval()
    {
        var table = new OwnershipTable(TopologyDocument.Default());
        var bridge = new PciFunctionSpec(PciAddress.Parse("0000:00:09.0"), PciNodeKind.RootPort, 0x8086, 0x7c98, 0x060400, "bridge", true, 0x0c, null, null);

        Assert.Equal(Errno.EINVAL, CoreState.ErrnoOf(() => table.AddDevice(bridge)));
    }

    [Fact]
    public async Task RemoveDevice_InUserOwnedGroup_FailsEbusy()
    {
        await using var broker = NewBroker();
        var session = broker.Sessions.Open();
        var container = broker.Vfio.CreateContainer(session, ContainerType.Iommufd);
        broker.Vfio.BindDevice(session, PciAddress.Parse("0000:06:00.0"), container.Id);

        // 07:00.0 is driver-less and not bound by anyone, but its group is user-owned.
        CoreState.AssertRejected(broker, Errno.EBUSY, () => broker.Table.RemoveDevice(PciAddress.Parse("0000:07:00.0")));
        CoreState.AssertRejected(broker, Errno.EBUSY, () => broker.Table.RemoveDevice(PciAddress.Parse("0000:06:00.0")));
    }

    [Fact]
    public void RemoveDevice_KernelBoundFunction_DropsItsKernelCount()
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        table.RemoveDevice(PciAddress.Parse("0000:02:00.1"));

        var group = table.Journal.Current.Groups[10];
        Assert.Equal((OwnerKind.Kernel, 1), (group.OwnerKind, group.OwnerCount));
        Assert.Equal("0000:02:00.0", string.Join(' ', group.Devices));
        Assert.False(table.Journal.Current.Devices.ContainsKey(PciAddress.Parse("0000:02:00.1")));
    }

    [Fact]
    public void RemoveDevice_LastFunctionOfGroup_RemovesGroup()
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        table.RemoveDevice(PciAddress.Parse("0000:01:00.0"));

        Assert.False(table.Journal.Current.Groups.ContainsKey(9));
        Assert.Equal(Errno.ENOENT, CoreState.ErrnoOf(() => table.GetGroup(9)));
    }

    [Fact]
    public void RemoveDevice_BridgeWithDevicesBelow_FailsEbusy()
    {
        var table = new OwnershipTable(TopologyDocument.Default());

        Assert.Equal(Errno.EBUSY, CoreState.ErrnoOf(() => table.RemoveDevice(PciAddress.Parse("0000:00:01.0"))));
        Assert.True(table.Journal.Current.Devices.ContainsKey(PciAddress.Parse("0000:00:01.0")));
    }

    private static Broker NewBroker() => new(TopologyDocument.Default(), null, new FakeTimeProvider());
}
