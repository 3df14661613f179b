using DmaBroker.Core;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Cluster.Tests;

/// <summary>Two or three replicas on one real etcd: one group table, exactly one owner (SPEC §16).</summary>
public sealed class ReplicaTests
{
    internal static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    /// <summary>Free groups of one device each in the default topology (the edu devices).</summary>
    internal static uint[] FreeGroups(Broker broker) =>
        [.. broker.Journal.Current.Groups.Values.Where(g => g.OwnerKind == OwnerKind.None && g.Devices.Length == 1).Select(g => g.Id)];

    /// <summary>Waits until <paramref name="broker"/>'s table satisfies <paramref name="done"/>, reading its watch (no polling).</summary>
    internal static async Task<GroupInfo> WaitForGroupAsync(Broker broker, uint groupId, Func<GroupInfo, bool> done)
    {
        using var watcher = broker.Journal.Watch();
        using var cts = new CancellationTokenSource(Timeout);
        await foreach (var ev in watcher.ReadAllAsync(cts.Token))
        {
            var group = ev.Snapshot is { } snapshot ? snapshot.Groups[groupId] : ev.Change is GroupChanged { Group: var g } && g.Id == groupId ? g : null;
            if (group is not null && done(group))
                return group;
        }
        throw new TimeoutException();
    }

    [Fact]
    public async Task Claim_OnOneReplica_IsSeenAndRefusedOnTheOther_UntilReleased()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var a = await Replica.StartAsync("a", etcd.Endpoints);
        await using var b = await Replica.StartAsync("b", etcd.Endpoints);
        Assert.NotEqual(a.Store.FirstSessionId, b.Store.FirstSessionId);
        var group = FreeGroups(a.Broker)[0];
        var sa = a.Broker.Sessions.Open("on-a");
        var sb = b.Broker.Sessions.Open("on-b");
        Assert.NotEqual(sa.Id, sb.Id);
        var ca = a.Broker.Vfio.CreateContainer(sa, ContainerType.Type1v2);
        var cb = b.Broker.Vfio.CreateContainer(sb, ContainerType.Type1v2);

        a.Broker.Vfio.SetContainer(sa, group, ca.Id);

        var seen = await WaitForGroupAsync(b.Broker, group, g => g.OwnerKind == OwnerKind.User);
        Assert.Equal(sa.Id, seen.OwnerSession);
        var listed = Assert.Single(a.Broker.ListSessions(a.Broker.Sessions.OpenModeGrant), x => x.Id == sa.Id);
        Assert.Equal("a", listed.Replica);
        Assert.Equal([group], listed.Groups);
        Assert.Equal(a.Broker.Journal.Current.Groups[group].Generation, seen.Generation);
        var refused = Assert.Throws<ErrnoException>(() => b.Broker.Vfio.SetContainer(sb, group, cb.Id));
        Assert.Equal(Errno.EPERM, refused.Errno);

        a.Broker.Vfio.UnsetContainer(sa, group);
        await WaitForGroupAsync(b.Broker, group, g => g.OwnerKind == OwnerKind.None);
        b.Broker.Vfio.SetContainer(sb, group, cb.Id);
        var regranted = await WaitForGroupAsync(a.Broker, group, g => g.OwnerKind == OwnerKind.User);
        Assert.Equal(sb.Id, regranted.OwnerSession);
        Assert.True(regranted.Generation > seen.Generation, "a new grant has a new, greater generation");
    }

    /// <summary>A new session of the broker that claims the group into a container of its own.</summary>
    internal static Session Claim(Broker broker, uint group, string? name = null)
    {
        var session = broker.Sessions.Open(name);
        broker.Vfio.SetContainer(session, group, broker.Vfio.CreateContainer(session, ContainerType.Type1v2).Id);
        return session;
    }

    [Fact]
    public async Task Claim_WhenEtcdAlreadyHoldsAnotherReplicasGrant_IsRefusedEvenBeforeTheWatchHasIt()
    {
        // The compare in the transaction decides, not this replica's (possibly late) view.
        await using var etcd = await EtcdCluster.StartAsync();
        await using var a = await Replica.StartAsync("a", etcd.Endpoints);
        await using var b = await Replica.StartAsync("b", etcd.Endpoints);
        var group = FreeGroups(a.Broker)[0];
        var sa = a.Broker.Sessions.Open();
        var sb = b.Broker.Sessions.Open();
        a.Broker.Vfio.SetContainer(sa, group, a.Broker.Vfio.CreateContainer(sa, ContainerType.Type1v2).Id);
        var cb = b.Broker.Vfio.CreateContainer(sb, ContainerType.Type1v2);
        var before = b.Broker.Journal.Current.Groups[group];
        // Either b's watch already has a's grant (refused by the §3 check) or it has not (refused
        // by etcd's compare): EPERM both ways, and b's table is not changed by the refusal.
        var refused = Assert.Throws<ErrnoException>(() => b.Broker.Vfio.SetContainer(sb, group, cb.Id));
        Assert.Equal(Errno.EPERM, refused.Errno);
        Assert.Contains(b.Broker.Journal.Current.Groups[group].OwnerKind, new[] { before.OwnerKind, OwnerKind.User });
        Assert.NotEqual(sb.Id, b.Broker.Journal.Current.Groups[group].OwnerSession);
    }

    [Fact]
    public async Task SecondReplica_WithALiveReplicasName_IsRefusedWithEexist()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var a = await Replica.StartAsync("same", etcd.Endpoints);
        var refused = await Assert.ThrowsAsync<ErrnoException>(() => Replica.StartAsync("same", etcd.Endpoints));
        Assert.Equal(Errno.EEXIST, refused.Errno);
    }
}
