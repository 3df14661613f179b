using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core;

/// <summary>Broker settings.</summary>
public sealed record BrokerOptions
{
    public SessionOptions Sessions { get; init; } = new();

    /// <summary>Events a watcher may fall behind before it is resynchronised with a snapshot.</summary>
    public int WatchBuffer { get; init; } = 1024;
}

/// <summary>Live counts of what the broker holds, for operators and leak checks.</summary>
public readonly record struct BrokerStats(
    int Sessions, int Containers, int UserOwnedGroups, int Watchers, long SessionsOpened, long SessionsClosed,
    ulong MemoryBytes, int OpenDevices, int DmaStreams, int Mappings);

/// <summary>
/// The broker's core, composed: the ownership table, the VFIO user side, and the session
/// registry whose teardown releases what a session holds. No wire, no hosting.
/// </summary>
public sealed class Broker : IAsyncDisposable
{
    public Broker(TopologyDocument topology, BrokerOptions? options = null, TimeProvider? time = null)
    {
        Options = options ?? new BrokerOptions();
        Table = new OwnershipTable(topology, Options.WatchBuffer);
        Vfio = new VfioDriver(Table, Options.Sessions.DmaLimit);
        Sessions = new SessionRegistry(time ?? TimeProvider.System, Options.Sessions, Vfio.Teardown,
            s => Journal.Publish(new SessionEnded(s.Id, s.EndMessage ?? "")));
    }

    public BrokerOptions Options { get; }
    public OwnershipTable Table { get; }
    public VfioDriver Vfio { get; }
    public SessionRegistry Sessions { get; }
    public TopologyJournal Journal => Table.Journal;

    public BrokerStats GetStats()
    {
        var counts = Sessions.Counts;
        var live = Sessions.Live;
        return new BrokerStats(
            counts.Live,
            Vfio.LiveContainers,
            Journal.Current.Groups.Values.Count(g => g.OwnerKind == OwnerKind.User),
            Journal.WatcherCount,
            counts.Opened,
            counts.Closed,
            live.Aggregate(0UL, (sum, s) => sum + s.Memory.Used),
            Vfio.OpenDevices,
            live.Sum(s => s.StreamCount),
            Vfio.Mappings);
    }


    public async ValueTask DisposeAsync() => await Sessions.ShutdownAsync().ConfigureAwait(false);
}
