using System.Diagnostics.Metrics;
using DmaBroker.Core.Access;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Telemetry;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core;

/// <summary>What a broker is built with; the defaults are SPEC's.</summary>
public sealed record BrokerOptions
{
    /// <summary>Leases, limits and grace periods that apply to every session.</summary>
    public SessionOptions Sessions { get; init; } = new();

    /// <summary>Events a watcher may fall behind before it is resynchronised with a snapshot.</summary>
    public int WatchBuffer { get; init; } = 1024;

    /// <summary>
    /// Where group ownership is decided (SPEC §16): this process alone (the default,
    /// <see cref="EmbeddedOwnershipStore"/>), or a cluster store shared by several replicas.
    /// </summary>
    public IOwnershipStore? Store { get; init; }

    /// <summary>
    /// The nice value (0 to 19) of the threads on which devices do their heavy work
    /// (<see cref="DeviceEngines"/>): higher yields more of the CPU to control calls while
    /// devices run flat out. 0 runs them at the broker's own priority.
    /// </summary>
    public int DeviceNice { get; init; } = DefaultDeviceNice;

    /// <summary>How many threads devices do their heavy work on: one per processor by default.</summary>
    public int DeviceThreads { get; init; } = Environment.ProcessorCount;

    /// <summary>The default <see cref="DeviceNice"/>.</summary>
    public const int DefaultDeviceNice = 10;
}

/// <summary>Live counts of what the broker holds, for operators and leak checks.</summary>
/// <param name="Sessions">Sessions live and not ending.</param>
/// <param name="Containers">Containers not yet destroyed.</param>
/// <param name="UserOwnedGroups">Groups a session owns.</param>
/// <param name="Watchers">Open watches.</param>
/// <param name="SessionsOpened">Sessions opened since start.</param>
/// <param name="SessionsClosed">Sessions that have ended (or begun to) since start.</param>
/// <param name="MemoryBytes">Session memory allocated, in bytes.</param>
/// <param name="OpenDevices">Device handles open.</param>
/// <param name="DmaStreams">DMA streams open.</param>
/// <param name="Mappings">IOVA mappings in every container.</param>
public readonly record struct BrokerStats(
    int Sessions, int Containers, int UserOwnedGroups, int Watchers, long SessionsOpened, long SessionsClosed,
    ulong MemoryBytes, int OpenDevices, int DmaStreams, int Mappings);

/// <summary>One live session as Kernel.ListSessions shows it.</summary>
/// <param name="Id">The public session id.</param>
/// <param name="Principal">Who opened it.</param>
/// <param name="ClientName">The name from its hello.</param>
/// <param name="Peer">The peer address of the connection that opened it.</param>
/// <param name="Age">How long it has been open, on the broker's clock.</param>
/// <param name="Groups">The groups it owns, ascending.</param>
/// <param name="MemoryBytes">Session memory it has allocated.</param>
/// <param name="DmaStreams">Its DMA streams open.</param>
public sealed record SessionSummary(ulong Id, string Principal, string ClientName, string Peer, TimeSpan Age,
    IReadOnlyList<uint> Groups, ulong MemoryBytes, int DmaStreams)
{
    /// <summary>The replica that serves it (SPEC §16); empty for a single broker.</summary>
    public string Replica { get; init; } = "";
}

/// <summary>
/// A change of a group's user DMA ownership, as the journal published it: a claim (the owner's
/// count went up, from 0 when the group was just granted) or a release (down, to 0 when the group
/// went back to the kernel). What an audit log records for each.
/// </summary>
/// <param name="GroupId">The group.</param>
/// <param name="SessionId">The session that claimed or released.</param>
/// <param name="Principal">Who that session belongs to.</param>
/// <param name="Generation">The generation of the grant: new with each grant, kept until its release.</param>
/// <param name="OwnerCountBefore">The session's claims on the group before the change.</param>
/// <param name="OwnerCountAfter">Its claims after: 0 when the group is free again.</param>
/// <param name="SessionEnd">
/// For a release the session's teardown made: why the session ended (lease expired, revoked by
/// admin…). Null when the session's own call (UnsetContainer, UnbindDevice, a claim) made it.
/// </param>
public sealed record OwnershipChange(uint GroupId, ulong SessionId, string Principal, ulong Generation,
    int OwnerCountBefore, int OwnerCountAfter, string? SessionEnd)
{
    /// <summary>True for a claim, false for a release.</summary>
    public bool IsClaim => OwnerCountAfter > OwnerCountBefore;
}

/// <summary>
/// The broker's core, composed: the ownership table, the VFIO user side, and the session
/// registry whose teardown releases what a session holds. No wire, no hosting.
/// </summary>
public sealed class Broker : IAsyncDisposable
{
    /// <summary>
    /// Removes the shared-memory files (SPEC §15) that brokers killed before they could end their
    /// sessions left under /dev/shm: those whose broker process no longer exists. A broker host
    /// calls it once at start. Returns how many files went.
    /// </summary>
    public static int RemoveOrphanedSharedMemory() => Memory.SharedMemoryFile.RemoveOrphans();

    /// <summary>
    /// A broker whose table starts from <paramref name="topology"/> (SPEC §2). Leases, grace periods
    /// and the devices' own timing (an edu DMA) run on <paramref name="time"/>, so tests can drive
    /// them with a fake clock. Its instruments are on a meter from <paramref name="meterFactory"/>
    /// (the host's), or on a meter of its own. <paramref name="ownershipChanged"/> is told of every claim and release, whichever
    /// path made it, in the order the journal publishes them, under the group's lock: it must be
    /// quick and must not call back into the broker (an audit log).
    /// </summary>
    public Broker(TopologyDocument topology, BrokerOptions? options = null, TimeProvider? time = null, IMeterFactory? meterFactory = null,
        Action<OwnershipChange>? ownershipChanged = null)
    {
        Options = options ?? new BrokerOptions();
        var clock = time ?? TimeProvider.System;
        Table = new OwnershipTable(topology, Options.WatchBuffer, clock, Options.Store);
        Metrics = new BrokerMetrics(meterFactory, LiveSessions, GroupOwners, () => Journal.WatcherCount, Table.Store.Replica);
        // Before the VFIO driver: open devices continue their work on the engines (IDevicePort.Post).
        Engines = new DeviceEngines(Options.DeviceThreads, Options.DeviceNice);
        Vfio = new VfioDriver(Table, Metrics, Options.Sessions.DmaLimit, Engines);
        Table.DetachRemoved = Vfio.DetachRemoved;
        Sessions = new SessionRegistry(clock, Options.Sessions, Vfio.Teardown, s =>
        {
            // Measured before it is published, so whoever sees the session end finds it counted.
            if (s.EndReason is { } reason)
                Metrics.SessionReleased(reason, clock.GetElapsedTime(s.EndingSince));
            Journal.Publish(new SessionEnded(s.Id, s.EndMessage ?? ""));
            Table.Store.SessionEnded(s);
        })
        {
            FirstId = Table.Store.FirstSessionId,
        };
        Faults = new FaultInjector(Table, Vfio, Sessions, clock);
        if (ownershipChanged is not null)
            Journal.GroupTransition = (before, after) => Report(before, after, ownershipChanged);
    }

    /// <summary>The settings the broker was built with.</summary>
    public BrokerOptions Options { get; }

    /// <summary>The kernel and operator side: devices, groups, driver binding, hotplug.</summary>
    public OwnershipTable Table { get; }

    /// <summary>The user side: containers, group and device claims, mappings, open devices.</summary>
    public VfioDriver Vfio { get; }

    /// <summary>Who is connected: opens, authenticates and ends sessions, releasing what they held.</summary>
    public SessionRegistry Sessions { get; }

    /// <summary>Fault injection (SPEC §14): faults armed on devices, surprise removal, cut connections.</summary>
    public FaultInjector Faults { get; }

    /// <summary>The threads on which devices do their heavy work, below the control plane's priority.</summary>
    public DeviceEngines Engines { get; }

    /// <summary>The broker's instruments (SPEC §13): its meter, counters and live counts.</summary>
    public BrokerMetrics Metrics { get; }

    /// <summary>The table's revisioned snapshots and changes, for readers and watchers.</summary>
    public TopologyJournal Journal => Table.Journal;

    /// <summary>What the broker holds right now; a moment's counts, not a consistent snapshot.</summary>
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

    /// <summary>
    /// Who holds what (Kernel.ListSessions): the sessions <paramref name="caller"/> may see,
    /// oldest first, each with the groups it owns at this revision, its memory and DMA streams.
    /// </summary>
    public IReadOnlyList<SessionSummary> ListSessions(Grant caller)
    {
        var groups = Journal.Current.Groups.Values.Where(g => g.OwnerKind == OwnerKind.User).ToLookup(g => g.OwnerSession, g => g.Id);
        var now = Sessions.Now;
        var replica = Table.Store.Replica ?? "";
        return [.. Sessions.Visible(caller).Select(s => new SessionSummary(
            s.Id, s.Principal, s.ClientName, s.Peer, now - s.OpenedAt, [.. groups[s.Id].Order()], s.Memory.Used, s.StreamCount)
        {
            Replica = replica,
        })];
    }

    // A group's user ownership before and after one published change, as claims and releases.
    private void Report(GroupInfo before, GroupInfo after, Action<OwnershipChange> report)
    {
        var wasUser = before.OwnerKind == OwnerKind.User;
        var isUser = after.OwnerKind == OwnerKind.User;
        if (wasUser && isUser && before.OwnerSession == after.OwnerSession)
        {
            if (before.OwnerCount != after.OwnerCount)
                report(Change(after, before.OwnerCount, after.OwnerCount));
            return;
        }
        if (wasUser)
            report(Change(before, before.OwnerCount, 0));
        if (isUser)
            report(Change(after, 0, after.OwnerCount));
    }

    private OwnershipChange Change(GroupInfo owned, int countBefore, int countAfter)
    {
        var session = Sessions.Get(owned.OwnerSession);
        // The teardown runs only once every operation of the session has left (its gate is
        // drained), so a release seen then is the session's end and never one of its own calls.
        var ending = countAfter < countBefore && session is { Gate.IsDrained: true } ? session.EndMessage ?? "" : null;
        return new OwnershipChange(owned.Id, owned.OwnerSession, session?.Principal ?? "", owned.Generation, countBefore, countAfter, ending);
    }

    // Read when a metrics reader collects, long after construction.
    private int LiveSessions() => Sessions.Counts.Live;

    private IEnumerable<OwnerKind> GroupOwners() => Journal.Current.Groups.Values.Select(g => g.OwnerKind);

    /// <summary>Ends every session, each released as if revoked, and refuses new ones; then stops its instruments.</summary>
    public async ValueTask DisposeAsync()
    {
        await Sessions.ShutdownAsync().ConfigureAwait(false);
        Engines.Dispose();
        Metrics.Dispose();
    }
}
