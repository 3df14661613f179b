using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The table's side of a cluster store (SPEC §16): what it tells the store of each driver change
/// and hotplug, that a refusal changes nothing, and how it takes another replica's word.
/// </summary>
public sealed class OwnershipStoreTests
{
    private static readonly PciAddress Edu = PciAddress.Parse("0000:08:00.0");
    private static readonly PciAddress Nic = PciAddress.Parse("0000:02:00.1");

    /// <summary>Records every driver change and hotplug; refuses them all with EAGAIN while <see cref="Refuse"/> is set.</summary>
    private sealed class RecordingStore : IOwnershipStore
    {
        public List<string> Calls { get; } = [];
        public bool Refuse { get; set; }
        public string? Replica => "here";
        public ulong FirstSessionId => 1;
        public ulong CommitClaim(uint groupId, Session session, int countBefore, ulong generation) => countBefore == 0 ? generation + 1 : generation;
        public void CommitRelease(uint groupId, Session session, int countBefore, int countAfter, ulong generation) { }
        public void SessionEnded(Session session) { }

        public void CommitDriver(uint groupId, GroupOwner owner, PciAddress device, string? driverBefore, string? driverAfter, int kernelCountAfter) =>
            Record($"driver g{groupId} {owner.Kind}({owner.Count}) {device} {driverBefore ?? "-"}->{driverAfter ?? "-"} kernel={kernelCountAfter}");

        public void CommitHotplug(PciFunctionSpec device, uint groupId, GroupOwner owner, bool added, string? driver, int kernelCountAfter) =>
            Record($"{(added ? "add" : "remove")} g{groupId} {owner.Kind}({owner.Count}) {device.Address} {driver ?? "-"} kernel={kernelCountAfter}");

        private void Record(string call)
        {
            Calls.Add(call);
            if (Refuse)
                throw new ErrnoException(Errno.EAGAIN, ErrorKind.FailedPrecondition, "refused by the test's store");
        }
    }

    private static (Broker Broker, RecordingStore Store) NewBroker()
    {
        var store = new RecordingStore();
        return (new Broker(TopologyDocument.Default(), new BrokerOptions { Store = store }), store);
    }

    [Fact]
    public void DriverChanges_TellTheStoreTheOwnerTheTableHolds_AndTheKernelCountAfter()
    {
        var (broker, store) = NewBroker();
        var edu = broker.Journal.Current.Devices[Edu].GroupId;
        var nic = broker.Journal.Current.Devices[Nic].GroupId;

        broker.Table.UnbindDriver(Edu);
        broker.Table.BindDriver(Edu, "ixgbe");
        broker.Table.UnbindDriver(Nic);

        Assert.Equal(
        [
            $"driver g{edu} None(0) {Edu} vfio-pci->- kernel=0",
            $"driver g{edu} None(0) {Edu} -->ixgbe kernel=1",
            $"driver g{nic} Kernel(2) {Nic} ixgbe->- kernel=1",
        ], store.Calls);
    }

    [Fact]
    public void Hotplug_TellsTheStoreTheGroupTheDeviceJoins()
    {
        var (broker, store) = NewBroker();
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, "ixgbe");

        var added = broker.Table.AddDevice(spec);
        broker.Table.RemoveDevice(Nic);

        var nicGroup = broker.Journal.Current.Devices[PciAddress.Parse("0000:02:00.0")].GroupId;
        Assert.Equal(
        [
            $"add g{added.GroupId} None(0) {spec.Address} ixgbe kernel=1",
            $"remove g{nicGroup} Kernel(2) {Nic} ixgbe kernel=1",
        ], store.Calls);
        Assert.Equal(OwnerKind.Kernel, broker.Journal.Current.Groups[added.GroupId].OwnerKind);
    }

    [Fact]
    public void StoreRefusal_OfADriverChangeOrHotplug_ChangesNothing()
    {
        var (broker, store) = NewBroker();
        store.Refuse = true;
        var before = broker.Journal.Current;
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, null);

        Assert.Equal(Errno.EAGAIN, Assert.Throws<ErrnoException>(() => broker.Table.UnbindDriver(Nic)).Errno);
        Assert.Equal(Errno.EAGAIN, Assert.Throws<ErrnoException>(() => broker.Table.UnbindDriver(Edu)).Errno);
        Assert.Equal(Errno.EAGAIN, Assert.Throws<ErrnoException>(() => broker.Table.AddDevice(spec)).Errno);
        Assert.Equal(Errno.EAGAIN, Assert.Throws<ErrnoException>(() => broker.Table.RemoveDevice(Nic)).Errno);

        Assert.Same(before, broker.Journal.Current);
        // The refused add took no group id: the next add gets the one it was offered.
        store.Refuse = false;
        var added = broker.Table.AddDevice(spec);
        Assert.Equal(store.Calls[^1], $"add g{added.GroupId} None(0) {spec.Address} - kernel=0");
        Assert.Equal(store.Calls[2], store.Calls[^1]);
    }

    [Fact]
    public void AddDevice_AfterTheLastHotAddedGroupWasRemoved_GetsANewGroupId()
    {
        // The id a store is told (and a cluster records) is never handed out again.
        var (broker, store) = NewBroker();
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, null);
        var first = broker.Table.AddDevice(spec);
        broker.Table.RemoveDevice(spec.Address);

        var second = broker.Table.AddDevice(spec);

        Assert.True(second.GroupId > first.GroupId, $"group {first.GroupId} came back as {second.GroupId}");
        Assert.Equal($"add g{second.GroupId} None(0) {spec.Address} - kernel=0", store.Calls[^1]);
    }

    [Fact]
    public void ApplyRemote_AGrantToAnotherReplicasSession_ResetsThisReplicasCopiesOfTheDevices()
    {
        // SPEC §10.5 across replicas: whoever owns the group here next finds its devices reset.
        var (broker, _) = NewBroker();
        var device = broker.Table.GetDevice(Edu);
        var group = device.Group.Id;
        lock (device.Model.Sync)
            device.Model.ConfigWrite(0x04, [(byte)(Devices.DeviceModel.CommandBusMaster | Devices.DeviceModel.CommandMemory), 0]);
        Assert.True(device.Model.BusMaster);

        Assert.Null(broker.Table.ApplyRemote(group, () => true, () => { }, new RemoteOwner(77, "there"), 1, 100));
        Assert.False(device.Model.BusMaster);
        var command = new byte[2];
        device.Model.ConfigRead(0x04, command);
        Assert.Equal([0, 0], command);
        var owned = broker.Journal.Current.Groups[group];
        Assert.Equal((OwnerKind.User, 1, 77UL, 100UL, DomainKind.Blocking), (owned.OwnerKind, owned.OwnerCount, owned.OwnerSession, owned.Generation, owned.Domain));
    }

    [Fact]
    public void ApplyRemote_OfTheSameOwnersCount_DoesNotResetTheDevices()
    {
        var (broker, _) = NewBroker();
        var device = broker.Table.GetDevice(Edu);
        var group = device.Group.Id;
        broker.Table.ApplyRemote(group, () => true, () => { }, new RemoteOwner(77, "there"), 1, 100);
        lock (device.Model.Sync)
            device.Model.ConfigWrite(0x04, [(byte)Devices.DeviceModel.CommandBusMaster, 0]);

        broker.Table.ApplyRemote(group, () => true, () => { }, new RemoteOwner(77, "there"), 2, 100);

        Assert.True(device.Model.BusMaster);
        Assert.Equal(2, broker.Journal.Current.Groups[group].OwnerCount);
    }

    [Fact]
    public void ApplyRemote_KernelDriversOfAnotherReplica_MakeTheGroupKernelOwned_AndItsDriverShows()
    {
        var (broker, _) = NewBroker();
        var group = broker.Journal.Current.Devices[Edu].GroupId;
        var session = broker.Sessions.Open();

        broker.Table.ApplyRemoteDriver(Edu, "ixgbe", () => true, () => { });
        broker.Table.ApplyRemote(group, () => true, () => { }, null, 1, 0);

        var now = broker.Journal.Current;
        Assert.Equal(("ixgbe", OwnerKind.Kernel, 1), (now.Devices[Edu].Driver, now.Groups[group].OwnerKind, now.Groups[group].OwnerCount));
        Assert.Equal(Errno.EPERM, Assert.Throws<ErrnoException>(() =>
            broker.Vfio.SetContainer(session, group, broker.Vfio.CreateContainer(session, Vfio.ContainerType.Type1v2).Id)).Errno);

        broker.Table.ApplyRemoteDriver(Edu, null, () => true, () => { });
        broker.Table.ApplyRemote(group, () => true, () => { }, null, 0, 0);
        Assert.Equal(OwnerKind.None, broker.Journal.Current.Groups[group].OwnerKind);
        Assert.Null(broker.Journal.Current.Devices[Edu].Driver);
    }

    [Fact]
    public void ApplyRemoteHotplug_AddsIntoTheGroupTheOtherReplicaChose_AndRemoves()
    {
        var (broker, store) = NewBroker();
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, "ixgbe");

        broker.Table.ApplyRemoteHotplug(spec.Address, spec, 40, () => true, () => { });
        var now = broker.Journal.Current;
        Assert.Equal(40u, now.Devices[spec.Address].GroupId);
        Assert.Equal((OwnerKind.Kernel, 1), (now.Groups[40].OwnerKind, now.Groups[40].OwnerCount));
        // A local add after it never takes the group id another replica took.
        var next = broker.Table.AddDevice(spec with { Address = PciAddress.Parse("0000:00:1e.0") });
        Assert.True(next.GroupId > 40);

        broker.Table.ApplyRemoteHotplug(spec.Address, null, 0, () => true, () => { });
        Assert.False(broker.Journal.Current.Devices.ContainsKey(spec.Address));
        Assert.False(broker.Journal.Current.Groups.ContainsKey(40));
        Assert.Single(store.Calls);
    }

    /// <summary>
    /// The store marks another replica's hotplug or driver change applied when the table tells it so;
    /// a change that failed halfway must not be marked, or the store's reload skips it for good. So
    /// the table tells it only once the change is in: here each is in the journal by then.
    /// </summary>
    [Fact]
    public void ApplyRemoteHotplugAndDriver_TellApplied_OnlyOnceTheChangeIsInTheTable()
    {
        var (broker, _) = NewBroker();
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, Drivers.VfioPci);
        var told = new List<bool>();

        broker.Table.ApplyRemoteHotplug(spec.Address, spec, 40, () => true, () => told.Add(broker.Journal.Current.Devices.ContainsKey(spec.Address)));
        broker.Table.ApplyRemoteDriver(spec.Address, null, () => true, () => told.Add(broker.Journal.Current.Devices[spec.Address].Driver is null));
        broker.Table.ApplyRemoteHotplug(spec.Address, null, 0, () => true, () => told.Add(!broker.Journal.Current.Devices.ContainsKey(spec.Address)));

        Assert.Equal([true, true, true], told);
    }

    /// <summary>
    /// Another replica's DMA-API driver for a device of a group a user owns here (a report older than
    /// the claim, its watch behind) is neither bound nor counted (§3, §10.2), nor told applied, so a
    /// reload brings it again once the group is free.
    /// </summary>
    [Fact]
    public void ApplyRemoteDriver_OfADmaApiDriver_IntoAGroupAUserOwnsHere_IsNotBound_NorToldApplied()
    {
        var (broker, _) = NewBroker();
        var group = broker.Journal.Current.Devices[Edu].GroupId;
        var session = broker.Sessions.Open();
        broker.Vfio.SetContainer(session, group, broker.Vfio.CreateContainer(session, Vfio.ContainerType.Type1v2).Id);
        var told = false;

        broker.Table.ApplyRemoteDriver(Edu, "ixgbe", () => true, () => told = true);

        var now = broker.Journal.Current;
        Assert.Equal((Drivers.VfioPci, OwnerKind.User, 1, session.Id), (now.Devices[Edu].Driver, now.Groups[group].OwnerKind, now.Groups[group].OwnerCount, now.Groups[group].OwnerSession));
        Assert.False(told);
    }
}
