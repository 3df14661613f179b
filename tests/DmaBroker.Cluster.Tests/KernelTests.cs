using System.Buffers.Binary;
using Etcdserverpb;
using Google.Protobuf;
using Grpc.Net.Client;
using DmaBroker.Core;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Xunit.Abstractions;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// The kernel side across replicas (SPEC §16): driver binds and hotplug are etcd transactions on
/// the group's owner, so a DMA-API bind on one replica and a user claim on another never both win
/// (§3, §10.1-2), and every replica's table shows them.
/// </summary>
public sealed class KernelTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Timeout = ReplicaTests.Timeout;
    // The replicas' etcd leases: long, since fencing is not what these tests are about. With 3 s,
    // keepalives delayed past the fencing margin (CI runs the test assemblies side by side on two
    // cores) fenced and ended a session mid-test (EACCES where ENODEV was expected).
    private static readonly TimeSpan Lease = TimeSpan.FromSeconds(30);
    // An edu device with a group of its own, vfio-pci at boot, free (SPEC §2).
    private static readonly PciAddress Edu = PciAddress.Parse("0000:08:00.0");
    // Any driver without driver_managed_dma uses the kernel DMA API.
    private const string DmaApiDriver = "edu";
    private const ulong LivenessRegister = 0x04;

    /// <summary>Waits until <paramref name="broker"/>'s table satisfies <paramref name="done"/>, reading its watch (no polling).</summary>
    internal static async Task<TopologySnapshot> WaitForAsync(Broker broker, Func<TopologySnapshot, bool> done)
    {
        using var watcher = broker.Journal.Watch();
        if (broker.Journal.Current is var now && done(now))
            return now;
        using var cts = new CancellationTokenSource(Timeout);
        await foreach (var _ in watcher.ReadAllAsync(cts.Token))
        {
            if (broker.Journal.Current is var current && done(current))
                return current;
        }
        throw new TimeoutException();
    }

    /// <summary>One etcd member and replicas a and b on it, stopped in reverse order.</summary>
    private sealed class TwoReplicas : IAsyncDisposable
    {
        private TwoReplicas(EtcdCluster etcd, Replica a, Replica b) => (Etcd, A, B) = (etcd, a, b);

        public EtcdCluster Etcd { get; }
        public Replica A { get; }
        public Replica B { get; }

        public static async Task<TwoReplicas> StartAsync()
        {
            var etcd = await EtcdCluster.StartAsync();
            Replica? a = null;
            try
            {
                a = await Replica.StartAsync("a", etcd.Endpoints, ttl: Lease);
                return new TwoReplicas(etcd, a, await Replica.StartAsync("b", etcd.Endpoints, ttl: Lease));
            }
            catch
            {
                if (a is not null)
                    await a.DisposeAsync();
                await etcd.DisposeAsync();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            await B.DisposeAsync();
            await A.DisposeAsync();
            await Etcd.DisposeAsync();
        }
    }

    private static uint GroupOf(Broker broker, PciAddress device) => broker.Journal.Current.Devices[device].GroupId;

    [Fact]
    public async Task KernelBind_OnOneReplica_RefusesAUserClaimOnTheOther_UntilUnbound()
    {
        await using var pair = await TwoReplicas.StartAsync();
        var (a, b) = (pair.A, pair.B);
        var group = GroupOf(a.Broker, Edu);
        var sb = b.Broker.Sessions.Open();
        var cb = b.Broker.Vfio.CreateContainer(sb, ContainerType.Type1v2);

        a.Broker.Table.UnbindDriver(Edu);
        a.Broker.Table.BindDriver(Edu, DmaApiDriver);
        // Refused before b's watch has the bind (etcd's compare) or after (the §3 check): EPERM both ways.
        Assert.Equal(Errno.EPERM, Assert.Throws<ErrnoException>(() => b.Broker.Vfio.SetContainer(sb, group, cb.Id)).Errno);
        var seen = await WaitForAsync(b.Broker, t => t.Devices[Edu].Driver == DmaApiDriver && t.Groups[group].OwnerKind == OwnerKind.Kernel);
        Assert.Equal(1, seen.Groups[group].OwnerCount);
        Assert.False(seen.Devices[Edu].DriverManagedDma);
        Assert.Equal(Errno.EPERM, Assert.Throws<ErrnoException>(() => b.Broker.Vfio.SetContainer(sb, group, cb.Id)).Errno);
        Assert.Equal(OwnerKind.Kernel, b.Broker.Journal.Current.Groups[group].OwnerKind);

        a.Broker.Table.UnbindDriver(Edu);
        await WaitForAsync(b.Broker, t => t.Devices[Edu].Driver is null && t.Groups[group].OwnerKind == OwnerKind.None);
        b.Broker.Vfio.SetContainer(sb, group, cb.Id);
        await WaitForAsync(a.Broker, t => t.Groups[group].OwnerKind == OwnerKind.User);
        // Now the other way round: a DMA-API driver cannot bind into a group a session of another replica owns.
        Assert.Equal(Errno.EBUSY, Assert.Throws<ErrnoException>(() => a.Broker.Table.BindDriver(Edu, DmaApiDriver)).Errno);
        Assert.Null(a.Broker.Journal.Current.Devices[Edu].Driver);
        // vfio-pci (driver_managed_dma) binds into it, and the owner's replica sees it.
        a.Broker.Table.BindDriver(Edu, Drivers.VfioPci);
        await WaitForAsync(b.Broker, t => t.Devices[Edu].Driver == Drivers.VfioPci);
        // ... but cannot be unbound from under a session that may have the device open on its replica.
        Assert.Equal(Errno.EBUSY, Assert.Throws<ErrnoException>(() => a.Broker.Table.UnbindDriver(Edu)).Errno);
    }

    [Fact]
    public async Task BootKernelDriver_UnboundOnOneReplica_LetsTheOtherClaimTheGroup()
    {
        // The NVMe drive boots with the nvme driver (KERNEL(1)); as on Linux, unbind it to hand it to userspace.
        await using var pair = await TwoReplicas.StartAsync();
        var (etcd, a, b) = (pair.Etcd, pair.A, pair.B);
        var nvme = PciAddress.Parse("0000:01:00.0");
        var group = GroupOf(a.Broker, nvme);
        Assert.Equal(OwnerKind.Kernel, b.Broker.Journal.Current.Groups[group].OwnerKind);

        a.Broker.Table.UnbindDriver(nvme);
        a.Broker.Table.BindDriver(nvme, Drivers.VfioPci);
        await WaitForAsync(b.Broker, t => t.Devices[nvme].Driver == Drivers.VfioPci && t.Groups[group].OwnerKind == OwnerKind.None);
        var sb = ReplicaTests.Claim(b.Broker, group);
        b.Broker.Vfio.CloseDevice(sb, b.Broker.Vfio.OpenDevice(sb, nvme).Id);

        // A replica that joins later takes the bindings from etcd, not from its topology.
        await using var c = await Replica.StartAsync("c", etcd.Endpoints, ttl: Lease);
        var joined = await WaitForAsync(c.Broker, t => t.Groups[group].OwnerKind == OwnerKind.User);
        Assert.Equal(Drivers.VfioPci, joined.Devices[nvme].Driver);
        Assert.Equal(sb.Id, joined.Groups[group].OwnerSession);
    }

    [Fact]
    public async Task KernelBindAndUserClaim_RacingFromTwoReplicas_NeverBothWin()
    {
        const int Rounds = 60;
        await using var pair = await TwoReplicas.StartAsync();
        var (a, b) = (pair.A, pair.B);
        var group = GroupOf(a.Broker, Edu);
        a.Broker.Table.UnbindDriver(Edu);
        await WaitForAsync(b.Broker, t => t.Devices[Edu].Driver is null);
        var users = new[] { a, b }.Select(r => (r.Broker, Session: r.Broker.Sessions.Open())).ToArray();
        var containers = users.Select(u => u.Broker.Vfio.CreateContainer(u.Session, ContainerType.Type1v2).Id).ToArray();
        int binds = 0, claims = 0;
        for (var round = 0; round < Rounds; round++)
        {
            // The roles swap every round: a binds while b claims, then b binds while a claims.
            var (kernel, user, container) = (users[round % 2].Broker, users[1 - round % 2], containers[1 - round % 2]);
            using var start = new Barrier(2);
            var bind = Task.Run(() =>
            {
                start.SignalAndWait(Timeout);
                return Attempt(() => kernel.Table.BindDriver(Edu, DmaApiDriver));
            });
            var claim = Task.Run(() =>
            {
                start.SignalAndWait(Timeout);
                return Attempt(() => user.Broker.Vfio.SetContainer(user.Session, group, container));
            });
            var (bound, claimed) = (await bind.WaitAsync(Timeout), await claim.WaitAsync(Timeout));
            // Exactly one wins; the loser gets §3's errno for what it lost to.
            Assert.True((bound is null) != (claimed is null), $"round {round}: bind {bound?.ToString() ?? "won"}, claim {claimed?.ToString() ?? "won"}");
            if (bound is null)
            {
                binds++;
                Assert.Equal(Errno.EPERM, claimed);
                var owned = await WaitForAsync(user.Broker, t => t.Groups[group].OwnerKind == OwnerKind.Kernel && t.Devices[Edu].Driver == DmaApiDriver);
                Assert.Equal(1, owned.Groups[group].OwnerCount);
                kernel.Table.UnbindDriver(Edu);
            }
            else
            {
                claims++;
                Assert.Equal(Errno.EBUSY, bound);
                var owned = await WaitForAsync(kernel, t => t.Groups[group].OwnerKind == OwnerKind.User);
                Assert.Equal(user.Session.Id, owned.Groups[group].OwnerSession);
                Assert.Null(owned.Devices[Edu].Driver);
                user.Broker.Vfio.UnsetContainer(user.Session, group);
            }
            // Both tables back at the start before the next round.
            foreach (var r in new[] { a, b })
                await WaitForAsync(r.Broker, t => t.Groups[group].OwnerKind == OwnerKind.None && t.Devices[Edu].Driver is null);
        }
        Assert.Equal(Rounds, binds + claims);
        output.WriteLine($"{binds} binds and {claims} claims won");

        static Errno? Attempt(Action change)
        {
            try
            {
                change();
                return null;
            }
            catch (ErrnoException e)
            {
                return e.Errno;
            }
        }
    }

    [Fact]
    public async Task Hotplug_OnOneReplica_IsSeenOnTheOther_AndReplayedByAReplicaThatJoinsLater()
    {
        await using var pair = await TwoReplicas.StartAsync();
        var (etcd, a, b) = (pair.Etcd, pair.A, pair.B);
        var added = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, Drivers.VfioPci);
        var nic = PciAddress.Parse("0000:02:00.1");
        var nicGroup = GroupOf(a.Broker, nic);

        var info = a.Broker.Table.AddDevice(added);
        var onB = await WaitForAsync(b.Broker, t => t.Devices.ContainsKey(added.Address));
        Assert.Equal(info, onB.Devices[added.Address]);
        AssertSameGroup(a.Broker.Journal.Current.Groups[info.GroupId], onB.Groups[info.GroupId]);
        // b can claim the new group and use the device: it is the same device in the same group.
        var sb = ReplicaTests.Claim(b.Broker, info.GroupId);
        var handle = b.Broker.Vfio.OpenDevice(sb, added.Address);
        // a cannot remove it from under b's session, nor add it twice.
        await WaitForAsync(a.Broker, t => t.Groups[info.GroupId].OwnerKind == OwnerKind.User);
        Assert.Equal(Errno.EBUSY, Assert.Throws<ErrnoException>(() => a.Broker.Table.RemoveDevice(added.Address)).Errno);
        Assert.Equal(Errno.EEXIST, Assert.Throws<ErrnoException>(() => a.Broker.Table.AddDevice(added)).Errno);
        b.Broker.Vfio.CloseDevice(sb, handle.Id);
        b.Broker.Vfio.UnsetContainer(sb, info.GroupId);
        await WaitForAsync(a.Broker, t => t.Groups[info.GroupId].OwnerKind == OwnerKind.None);

        // A kernel-driven function's removal takes its driver's count out of its group on every replica.
        b.Broker.Table.RemoveDevice(nic);
        var nicGone = await WaitForAsync(a.Broker, t => !t.Devices.ContainsKey(nic));
        Assert.Equal(1, nicGone.Groups[nicGroup].OwnerCount);
        Assert.Equal(OwnerKind.Kernel, nicGone.Groups[nicGroup].OwnerKind);

        await using var c = await Replica.StartAsync("c", etcd.Endpoints, ttl: Lease);
        var replayed = c.Broker.Journal.Current;
        Assert.Equal(info, replayed.Devices[added.Address]);
        Assert.False(replayed.Devices.ContainsKey(nic));
        AssertSameGroup(nicGone.Groups[nicGroup], replayed.Groups[nicGroup]);

        a.Broker.Table.RemoveDevice(added.Address);
        await WaitForAsync(b.Broker, t => !t.Devices.ContainsKey(added.Address) && !t.Groups.ContainsKey(info.GroupId));
        await WaitForAsync(c.Broker, t => !t.Devices.ContainsKey(added.Address) && !t.Groups.ContainsKey(info.GroupId));
        // Removed on a: gone everywhere, so removing it again on c is ENODEV.
        Assert.Equal(Errno.ENODEV, Assert.Throws<ErrnoException>(() => c.Broker.Table.RemoveDevice(added.Address)).Errno);
    }

    /// <summary>
    /// Another replica's hot-add of a device with a DMA-API driver into a group a session of this
    /// replica owns: possible only as a report older than the claim (added while the group was free,
    /// its driver unbound again, then claimed here before this replica's watch caught up). It must
    /// join as a local hot-add into a user-owned group does: the device joins, its DMA-API driver
    /// does not bind (§3, §10.2), and the user's count stays.
    /// </summary>
    [Fact]
    public async Task RemoteHotAdd_OfADmaApiDevice_IntoAGroupAUserOwnsHere_JoinsWithoutItsDriver_AndTheCountStays()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var a = await Replica.StartAsync("a", etcd.Endpoints, ttl: Lease);
        var group = GroupOf(a.Broker, Edu);
        var session = ReplicaTests.Claim(a.Broker, group);
        var added = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:08:00.1"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: false, DmaApiDriver);
        // Then another device, to a group of its own, so that once it shows the first transaction has been applied whole.
        var marker = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, Drivers.VfioPci);
        using var channel = GrpcChannel.ForAddress(etcd.Endpoints[0]);
        var kv = new KV.KVClient(channel);

        // What the other replica's hot-add wrote: the device, its driver, the shape.
        foreach (var (spec, groupId) in new[] { (added, group), (marker, 99u) })
        {
            var txn = new TxnRequest();
            txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = HotplugRecord.Key(spec.Address), Value = new HotplugRecord(true, groupId, spec).Encode() } });
            txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = DriverRecord.Key(spec.Address), Value = DriverRecord.Encode(spec.Driver) } });
            txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = HotplugRecord.ShapeKey, Value = ByteString.CopyFromUtf8("b") } });
            await kv.TxnAsync(txn);
        }
        var now = await WaitForAsync(a.Broker, t => t.Devices.ContainsKey(marker.Address));

        var owned = now.Groups[group];
        Assert.Equal((OwnerKind.User, 1, session.Id), (owned.OwnerKind, owned.OwnerCount, owned.OwnerSession));
        Assert.Contains(added.Address, owned.Devices);
        Assert.Null(now.Devices[added.Address].Driver);
        // The user's one claim is released as one: the group goes free, no count left behind.
        a.Broker.Vfio.UnsetContainer(session, group);
        Assert.Equal((OwnerKind.None, 0), (a.Broker.Journal.Current.Groups[group].OwnerKind, a.Broker.Journal.Current.Groups[group].OwnerCount));
    }

    [Fact]
    public async Task SurpriseRemove_OnOneReplica_OfADeviceASessionOfAnotherHoldsOpen_TakesItFromThatSession()
    {
        await using var pair = await TwoReplicas.StartAsync();
        var (a, b) = (pair.A, pair.B);
        var group = GroupOf(a.Broker, Edu);
        var sa = ReplicaTests.Claim(a.Broker, group);
        var handle = a.Broker.Vfio.OpenDevice(sa, Edu);
        await WaitForAsync(b.Broker, t => t.Groups[group].OwnerKind == OwnerKind.User);
        // A planned removal is refused while the group is owned, on any replica.
        Assert.Equal(Errno.EBUSY, Assert.Throws<ErrnoException>(() => b.Broker.Table.RemoveDevice(Edu)).Errno);

        await b.Broker.Faults.InjectAsync(Edu, new Core.Faults.FaultSettings(Core.Faults.FaultKind.SurpriseRemove)).WaitAsync(Timeout);

        using var cts = new CancellationTokenSource(Timeout);
        var told = await sa.Events.ReadAsync(cts.Token);
        while (told is not DeviceRemovedEvent)
            told = await sa.Events.ReadAsync(cts.Token);
        Assert.Equal(new DeviceRemovedEvent(Edu), told);
        var gone = await WaitForAsync(a.Broker, t => !t.Devices.ContainsKey(Edu));
        Assert.False(gone.Groups.ContainsKey(group));
        Assert.Equal(Errno.ENODEV, Assert.Throws<ErrnoException>(() => a.Broker.Vfio.ResetDevice(sa, handle.Id)).Errno);
        Assert.Empty(a.Broker.ListSessions(a.Broker.Sessions.OpenModeGrant).Single(s => s.Id == sa.Id).Groups);
    }

    [Fact]
    public async Task Replica_StartingFromAnotherTopology_IsRefusedWithEinval()
    {
        // A device without a driver key has its topology's driver: every replica must share one topology.
        await using var etcd = await EtcdCluster.StartAsync();
        await using var a = await Replica.StartAsync("a", etcd.Endpoints, ttl: Lease);
        var other = new TopologyDocument(TopologyDocument.Default().Functions.Where(f => f.Address != PciAddress.Parse("0000:0b:00.0")));
        await using var store = await EtcdOwnershipStore.ConnectAsync(new EtcdStoreOptions { Endpoints = etcd.Endpoints, Replica = "b" }).WaitAsync(Timeout);
        await using var broker = new Broker(other, new BrokerOptions { Store = store });

        var refused = await Assert.ThrowsAsync<ErrnoException>(() => store.StartAsync(broker).WaitAsync(Timeout));

        Assert.Equal(Errno.EINVAL, refused.Errno);
        Assert.Contains("same --topology", refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task KernelChanges_WhenEtcdIsGone_FailEagainAndChangeNothing()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var a = await Replica.StartAsync("a", etcd.Endpoints, ttl: Lease);
        var nic = PciAddress.Parse("0000:02:00.1");
        var added = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:00:1f.0"), 0x1234, 0x11e8, 0x00ff00, "edu", acs: true, null);
        await etcd.KillAsync(0);
        var before = a.Broker.Journal.Current;

        Action[] changes = [() => a.Broker.Table.UnbindDriver(nic), () => a.Broker.Table.UnbindDriver(Edu), () => a.Broker.Table.AddDevice(added), () => a.Broker.Table.RemoveDevice(nic)];
        foreach (var change in changes)
            Assert.Equal(Errno.EAGAIN, Assert.Throws<ErrnoException>(change).Errno);
        Assert.Same(before, a.Broker.Journal.Current);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task DeviceState_LeftOnOneReplica_IsResetForTheNextOwnerOnAnother(bool killed)
    {
        // SPEC §10.5 across replicas: a's session programs the device, then lets it go (or dies);
        // b's session claims the group and finds the device reset; and back again.
        await using var pair = await TwoReplicas.StartAsync();
        var (a, b) = (pair.A, pair.B);
        var group = GroupOf(a.Broker, Edu);
        const uint Reset = 0; // edu's liveness register holds the inverse of what was written: 0 after reset

        var sa = ReplicaTests.Claim(a.Broker, group);
        var ha = a.Broker.Vfio.OpenDevice(sa, Edu);
        Program(a.Broker, sa, ha.Id, 0x12345678);
        Assert.Equal(~0x12345678u, Liveness(a.Broker, sa, ha.Id));
        Assert.True(BusMaster(a.Broker, sa, ha.Id));
        if (killed)
        {
            await a.Broker.Sessions.EndAsync(sa, SessionEndReason.ConnectionLost).WaitAsync(Timeout);
        }
        else
        {
            a.Broker.Vfio.CloseDevice(sa, ha.Id);
            a.Broker.Vfio.UnsetContainer(sa, group);
        }
        await WaitForAsync(b.Broker, t => t.Groups[group].OwnerKind == OwnerKind.None);

        var sb = ReplicaTests.Claim(b.Broker, group);
        var hb = b.Broker.Vfio.OpenDevice(sb, Edu);
        Assert.Equal(Reset, Liveness(b.Broker, sb, hb.Id));
        Assert.False(BusMaster(b.Broker, sb, hb.Id));
        Program(b.Broker, sb, hb.Id, 0x0badcafe);
        await b.Broker.Sessions.EndAsync(sb, SessionEndReason.ConnectionLost).WaitAsync(Timeout);
        await WaitForAsync(a.Broker, t => t.Groups[group].OwnerKind == OwnerKind.None);

        var sa2 = ReplicaTests.Claim(a.Broker, group);
        var ha2 = a.Broker.Vfio.OpenDevice(sa2, Edu);
        Assert.Equal(Reset, Liveness(a.Broker, sa2, ha2.Id));
        Assert.False(BusMaster(a.Broker, sa2, ha2.Id));
    }

    private static void AssertSameGroup(GroupInfo expected, GroupInfo actual)
    {
        Assert.Equal(expected.Devices.AsEnumerable(), actual.Devices.AsEnumerable());
        Assert.Equal(expected with { Devices = actual.Devices }, actual);
    }

    // Sets Bus Master and writes the liveness register.
    private static void Program(Broker broker, Session session, ulong handle, uint liveness)
    {
        var command = broker.Vfio.RegionRead(session, handle, 7, 0x04, 2);
        command[0] |= 1 << 2;
        broker.Vfio.RegionWrite(session, handle, 7, 0x04, command);
        var value = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(value, liveness);
        broker.Vfio.RegionWrite(session, handle, 0, LivenessRegister, value);
    }

    private static uint Liveness(Broker broker, Session session, ulong handle) =>
        BinaryPrimitives.ReadUInt32LittleEndian(broker.Vfio.RegionRead(session, handle, 0, LivenessRegister, 4));

    private static bool BusMaster(Broker broker, Session session, ulong handle) =>
        (broker.Vfio.RegionRead(session, handle, 7, 0x04, 2)[0] & (1 << 2)) != 0;
}
