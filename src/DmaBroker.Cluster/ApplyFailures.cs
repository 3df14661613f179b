using System.Collections.Concurrent;

namespace DmaBroker.Cluster;

/// <summary>
/// The changes from etcd (a key at a mod revision) that failed to apply to the table, counted while
/// they fail in a row. The watch retries a failed change by reloading the table; one that fails
/// <see cref="Limit"/> times in a row would stall the watch for good, so it is given up (skipped as
/// if applied: the key's next change brings it again). Safe from the watch and from a fenced
/// session's reload at once.
/// </summary>
internal sealed class ApplyFailures
{
    /// <summary>How many times in a row one change may fail before it is given up.</summary>
    public const int Limit = 5;

    private readonly ConcurrentDictionary<string, (long Revision, int Failures)> _failures = new();

    /// <summary>True for a change already given up: it is not tried again.</summary>
    public bool GivenUp(string key, long revision) =>
        _failures.TryGetValue(key, out var f) && f.Revision == revision && f.Failures >= Limit;

    /// <summary>The key applied: its count starts over.</summary>
    public void Applied(string key) => _failures.TryRemove(key, out _);

    /// <summary>Counts a failure of the key's change at <paramref name="revision"/> (a change at another revision starts over); the failures in a row.</summary>
    public int Failed(string key, long revision) =>
        _failures.AddOrUpdate(key, (revision, 1), (_, f) => f.Revision == revision ? (revision, f.Failures + 1) : (revision, 1)).Failures;
}
