using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// A watcher that reconnects after a revision resumes with exactly the changes it missed while the
/// journal keeps them (as many as a watcher may buffer), and starts over from a snapshot otherwise:
/// the live view's <c>Last-Event-ID</c> (SPEC §13).
/// </summary>
public sealed class JournalResumeTests
{
    private const uint EduGroup = 14;

    [Theory]
    [InlineData(1ul, 6)]  // the boot revision: every change since
    [InlineData(4ul, 3)]
    [InlineData(7ul, 0)]  // the current revision: nothing missed
    public async Task Watch_ResumeAfterKeptRevision_YieldsExactlyTheLaterChanges(ulong after, int expected)
    {
        await using var broker = new Broker(TopologyDocument.Default(), new BrokerOptions { WatchBuffer = 8 }, new FakeTimeProvider());
        Churn(broker, toggles: 6);
        Assert.Equal(7ul, broker.Journal.Current.Revision);

        using var watcher = broker.Journal.Watch(after);
        Assert.True(watcher.Resumed);
        var session = broker.Sessions.Open();
        broker.Vfio.SetContainer(session, EduGroup, broker.Vfio.CreateContainer(session, ContainerType.Type1v2).Id);

        var revisions = await ReadAsync(watcher, expected + 1);
        Assert.Equal(Enumerable.Range((int)after + 1, expected + 1).Select(r => (ulong)r), revisions.Select(e => e.Revision));
        Assert.All(revisions, e => Assert.Null(e.Snapshot));
        Assert.Equal(OwnerKind.User, Assert.IsType<GroupChanged>(revisions[^1].Change).Group.OwnerKind);
    }

    [Theory]
    [InlineData(2ul)]   // older than the 4 changes kept
    [InlineData(99ul)]  // never reached: another broker's revision
    public async Task Watch_ResumeAfterRevisionNotKept_StartsWithSnapshot(ulong after)
    {
        await using var broker = new Broker(TopologyDocument.Default(), new BrokerOptions { WatchBuffer = 4 }, new FakeTimeProvider());
        Churn(broker, toggles: 6);

        using var watcher = broker.Journal.Watch(after);

        Assert.False(watcher.Resumed);
        var first = Assert.Single(await ReadAsync(watcher, 1));
        Assert.Equal(broker.Journal.Current.Revision, first.Snapshot?.Revision);
    }

    [Fact]
    public async Task Watch_ResumeAtOldestKept_YieldsTheKeptChanges()
    {
        await using var broker = new Broker(TopologyDocument.Default(), new BrokerOptions { WatchBuffer = 4 }, new FakeTimeProvider());
        Churn(broker, toggles: 6); // revisions 2..7; 4..7 kept

        using var watcher = broker.Journal.Watch(3);

        Assert.True(watcher.Resumed);
        Assert.Equal([4ul, 5, 6, 7], (await ReadAsync(watcher, 4)).Select(e => e.Revision));
    }

    [Fact]
    public void Snapshot_Devices_NameTheirBridgeAndKind()
    {
        var devices = new Broker(TopologyDocument.Default()).Journal.Current.Devices;

        var edu = devices[PciAddress.Parse("0000:06:00.0")];
        Assert.Equal((PciNodeKind.Endpoint, PciAddress.Parse("0000:05:00.0")), (edu.Kind, edu.Parent));
        var downstream = devices[PciAddress.Parse("0000:05:00.0")];
        Assert.Equal((PciNodeKind.SwitchDownstream, PciAddress.Parse("0000:04:00.0")), (downstream.Kind, downstream.Parent));
        var rootPort = devices[PciAddress.Parse("0000:00:04.0")];
        Assert.Equal((PciNodeKind.RootPort, (PciAddress?)null), (rootPort.Kind, rootPort.Parent));
    }

    // Claims and releases the edu group: one change each.
    private static void Churn(Broker broker, int toggles)
    {
        var session = broker.Sessions.Open();
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        for (var i = 0; i < toggles; i++)
        {
            if (i % 2 == 0)
                broker.Vfio.SetContainer(session, EduGroup, container.Id);
            else
                broker.Vfio.UnsetContainer(session, EduGroup);
        }
    }

    private static async Task<List<TopologyEvent>> ReadAsync(TopologyWatcher watcher, int count)
    {
        var events = new List<TopologyEvent>();
        await using var reader = watcher.ReadAllAsync().GetAsyncEnumerator();
        while (events.Count < count)
        {
            Assert.True(await reader.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));
            events.Add(reader.Current);
        }
        return events;
    }
}
