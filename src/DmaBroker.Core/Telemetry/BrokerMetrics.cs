using System.Diagnostics.Metrics;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Telemetry;

/// <summary>
/// The broker's instruments (SPEC §13), on one <see cref="System.Diagnostics.Metrics.Meter"/>
/// named <see cref="MeterName"/> per broker: created by the host's <see cref="IMeterFactory"/>
/// when there is one, so that several brokers in one process (tests) never count into each
/// other's instruments and a listener can tell them apart by <see cref="Meter"/>. Live counts are
/// observable instruments read from the broker's own state when collected. The DMA counters are
/// observable too, totals the DMA path adds to with one interlocked add each: as counters
/// recorded per access, an OpenTelemetry reader's aggregation added ~150 ns to every access, over
/// half of what a 64-byte device write costs (<c>MetricsBenchmark</c>). Claims and releases, rare,
/// are recorded as they happen. A replica of a cluster (SPEC §16) tags every measurement with
/// <c>replica</c>, its name, so that the series of several replicas stay apart wherever they are
/// gathered; a single process's series carry no such tag.
/// </summary>
public sealed class BrokerMetrics : IDisposable
{
    /// <summary>The meter's name, what an OpenTelemetry <c>AddMeter</c> subscribes to.</summary>
    public const string MeterName = "DmaBroker";

    /// <summary>The tag a cluster replica adds to every measurement: its name (SPEC §16).</summary>
    public const string ReplicaTag = "replica";

    /// <summary>The histogram buckets of release durations, in seconds: teardown is sub-millisecond unless DMA streams are slow to close (up to their 5 s grace).</summary>
    private static readonly double[] ReleaseBuckets = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

    // Each tag once, indexed by the enum's value, so recording looks it up and allocates nothing;
    // no tag (empty) where no member has the index.
    private static readonly KeyValuePair<string, object?>[][] Directions = ByValue<DmaAccess>("direction", Name);
    private static readonly KeyValuePair<string, object?>[][] FaultReasons = ByValue<FaultReason>("reason", Name);
    private static readonly KeyValuePair<string, object?>[][] EndReasons = ByValue<SessionEndReason>("reason", Name);
    private static readonly KeyValuePair<string, object?>[][] OwnerKinds = ByValue<OwnerKind>("owner_kind", Name);
    private static readonly KeyValuePair<string, object?>[][] ClaimRefusals = ByValue<Errno>("result", e => e.ToString().ToLowerInvariant());

    private readonly bool _ownsMeter;
    // This broker's tag sets: the ones above, each followed by the replica's tag in a cluster.
    private readonly KeyValuePair<string, object?>[] _none;
    private readonly KeyValuePair<string, object?>[] _claimOk;
    private readonly KeyValuePair<string, object?>[][] _directions;
    private readonly KeyValuePair<string, object?>[][] _faultReasons;
    private readonly KeyValuePair<string, object?>[][] _endReasons;
    private readonly KeyValuePair<string, object?>[][] _ownerKinds;
    private readonly KeyValuePair<string, object?>[][] _claimRefusals;
    private readonly Counter<long> _claims;
    // Totals since start, indexed by the enum's value as the tags are.
    private readonly long[] _dmaOperations = new long[Directions.Length];
    private readonly long[] _dmaBytes = new long[Directions.Length];
    private readonly long[] _dmaFaults = new long[FaultReasons.Length];
    private readonly Histogram<double> _releaseDuration;

    /// <summary>
    /// Creates the instruments on a meter from <paramref name="factory"/> (or a meter of its own
    /// when null, disposed with this). The three callbacks are read when a reader collects: the
    /// live sessions, every group's owner kind, and the open watches. <paramref name="replica"/>,
    /// a cluster replica's name (null for a single process), tags every measurement as
    /// <see cref="ReplicaTag"/>.
    /// </summary>
    public BrokerMetrics(IMeterFactory? factory, Func<int> liveSessions, Func<IEnumerable<OwnerKind>> groupOwners, Func<int> watchers,
        string? replica = null)
    {
        ArgumentNullException.ThrowIfNull(liveSessions);
        ArgumentNullException.ThrowIfNull(groupOwners);
        ArgumentNullException.ThrowIfNull(watchers);
        _ownsMeter = factory is null;
        Meter = factory?.Create(new MeterOptions(MeterName)) ?? new Meter(MeterName);
        KeyValuePair<string, object?>[] scope = replica is null ? [] : [new(ReplicaTag, replica)];
        _none = scope;
        _claimOk = [new("result", "ok"), .. scope];
        _directions = WithScope(Directions, scope);
        _faultReasons = WithScope(FaultReasons, scope);
        _endReasons = WithScope(EndReasons, scope);
        _ownerKinds = WithScope(OwnerKinds, scope);
        _claimRefusals = WithScope(ClaimRefusals, scope);

        Meter.CreateObservableUpDownCounter("dmabroker.sessions", () => new Measurement<int>(liveSessions(), _none), "{session}",
            "Sessions live and not ending.");
        Meter.CreateObservableUpDownCounter("dmabroker.groups.owned", () => CountOwners(groupOwners()), "{group}",
            "IOMMU groups by who holds their DMA ownership: none, kernel (DMA-API drivers) or user (a session).");
        Meter.CreateObservableUpDownCounter("dmabroker.watchers", () => new Measurement<int>(watchers(), _none), "{watcher}",
            "Topology watches open.");
        _claims = Meter.CreateCounter<long>("dmabroker.claims", "{claim}",
            "User claims of a group (SetContainer) or device (BindDevice), by result: ok, or the errno that refused it (eperm, ebusy, …).");
        Meter.CreateObservableCounter("dmabroker.dma.operations", () => Totals(_dmaOperations, _directions), "{operation}",
            "Device DMA accesses that went through the IOMMU, by direction from the device's side: read (host memory to the device) or write (the device into host memory); a copy is one of each.");
        Meter.CreateObservableCounter("dmabroker.dma.bytes", () => Totals(_dmaBytes, _directions), "By",
            "Bytes moved by device DMA through the IOMMU, by direction as dmabroker.dma.operations.");
        Meter.CreateObservableCounter("dmabroker.dma.faults", () => Totals(_dmaFaults, _faultReasons), "{fault}",
            "Device DMA accesses that faulted, by reason: unmapped, permission, bus_master_off or blocked.");
        _releaseDuration = Meter.CreateHistogram("dmabroker.session.release.duration", "s",
            "From a session beginning to end until everything it held is released and its DMA streams closed, by end reason.",
            tags: null, new InstrumentAdvice<double> { HistogramBucketBoundaries = ReleaseBuckets });
    }

    /// <summary>The meter the instruments are on; one per broker.</summary>
    public Meter Meter { get; }

    /// <summary>Runs a user claim and counts its outcome: ok, or the errno that refused it.</summary>
    internal void CountClaim(Action claim)
    {
        try
        {
            claim();
        }
        catch (ErrnoException e)
        {
            _claims.Add(1, _claimRefusals[(int)e.Errno]);
            throw;
        }
        _claims.Add(1, _claimOk);
    }

    /// <summary>A device access of <paramref name="bytes"/> bytes went through. Allocates nothing.</summary>
    internal void DmaMoved(DmaAccess access, int bytes)
    {
        Interlocked.Increment(ref _dmaOperations[(int)access]);
        Interlocked.Add(ref _dmaBytes[(int)access], bytes);
    }

    /// <summary>A device access faulted. Allocates nothing.</summary>
    internal void DmaFaulted(FaultReason reason) => Interlocked.Increment(ref _dmaFaults[(int)reason]);

    /// <summary>A session is gone, <paramref name="duration"/> after it began to end.</summary>
    internal void SessionReleased(SessionEndReason reason, TimeSpan duration) =>
        _releaseDuration.Record(duration.TotalSeconds, _endReasons[(int)reason]);

    /// <summary>Disposes the meter if this created it; a factory's meters are the factory's to dispose.</summary>
    public void Dispose()
    {
        if (_ownsMeter)
            Meter.Dispose();
    }

    /// <summary>Every owner kind, zeros included, so each series exists from the first scrape.</summary>
    private Measurement<int>[] CountOwners(IEnumerable<OwnerKind> owners)
    {
        var counts = new int[_ownerKinds.Length];
        foreach (var owner in owners)
            counts[(int)owner]++;
        return [.. Enum.GetValues<OwnerKind>().Select(kind => new Measurement<int>(counts[(int)kind], _ownerKinds[(int)kind]))];
    }

    /// <summary>Each total with its tags; every member reported, zeros included.</summary>
    private static Measurement<long>[] Totals(long[] totals, KeyValuePair<string, object?>[][] tags) =>
        [.. Enumerable.Range(0, tags.Length).Where(i => tags[i].Length > 0).Select(i => new Measurement<long>(Interlocked.Read(ref totals[i]), tags[i]))];

    /// <summary>Each member's tags followed by <paramref name="scope"/> (the replica's tag, or nothing).</summary>
    private static KeyValuePair<string, object?>[][] WithScope(KeyValuePair<string, object?>[][] tags, KeyValuePair<string, object?>[] scope) =>
        [.. tags.Select(t => t.Length == 0 ? t : [.. t, .. scope])];

    /// <summary>An enum member's tag value: snake_case, as OpenTelemetry attribute values are (BusMasterOff → bus_master_off).</summary>
    private static string Name<T>(T value) where T : struct, Enum
    {
        var text = value.ToString();
        var name = new System.Text.StringBuilder(text.Length + 4);
        foreach (var c in text)
        {
            if (char.IsUpper(c) && name.Length > 0)
                name.Append('_');
            name.Append(char.ToLowerInvariant(c));
        }
        return name.ToString();
    }

    /// <summary>The tag of each member of <typeparamref name="T"/> at the index of its value (the enums here are small and non-negative); none where no member has the index.</summary>
    private static KeyValuePair<string, object?>[][] ByValue<T>(string key, Func<T, string> name) where T : struct, Enum
    {
        var values = Enum.GetValues<T>();
        var tags = new KeyValuePair<string, object?>[values.Max(v => Convert.ToInt32(v, System.Globalization.CultureInfo.InvariantCulture)) + 1][];
        Array.Fill(tags, []);
        foreach (var value in values)
            tags[Convert.ToInt32(value, System.Globalization.CultureInfo.InvariantCulture)] = [new(key, name(value))];
        return tags;
    }
}
