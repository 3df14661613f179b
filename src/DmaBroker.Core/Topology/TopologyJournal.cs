using System.Collections.Immutable;
using System.Runtime.CompilerServices;
using System.Threading.Channels;

namespace DmaBroker.Core.Topology;

/// <summary>One change to the device and group table.</summary>
public abstract record TopologyChange;

/// <summary>A group's ownership, domain or devices changed; carries the whole group as it is now.</summary>
/// <param name="Group">The group after the change.</param>
public sealed record GroupChanged(GroupInfo Group) : TopologyChange;

/// <summary>A device appeared or its driver changed; carries the whole device as it is now.</summary>
/// <param name="Device">The device after the change.</param>
public sealed record DeviceChanged(DeviceInfo Device) : TopologyChange;

/// <summary>A device was hot-removed.</summary>
/// <param name="Address">Where it was.</param>
public sealed record DeviceRemoved(PciAddress Address) : TopologyChange;

/// <summary>A group lost its last device and is gone.</summary>
/// <param name="GroupId">Its number.</param>
public sealed record GroupRemoved(uint GroupId) : TopologyChange;

/// <summary>A session ended and everything it held is released; changes no table entry.</summary>
/// <param name="SessionId">The session's public id.</param>
/// <param name="Reason">Why it ended, in words.</param>
public sealed record SessionEnded(ulong SessionId, string Reason) : TopologyChange;

/// <summary>The whole table at one revision; immutable, so readers never lock.</summary>
/// <param name="Revision">The revision of the last change it includes; each change adds one.</param>
/// <param name="Groups">Every group by id.</param>
/// <param name="Devices">Every device by address.</param>
public sealed record TopologySnapshot(
    ulong Revision,
    ImmutableSortedDictionary<uint, GroupInfo> Groups,
    ImmutableSortedDictionary<PciAddress, DeviceInfo> Devices)
{
    internal TopologySnapshot Apply(TopologyChange change) => change switch
    {
        GroupChanged g => this with { Revision = Revision + 1, Groups = Groups.SetItem(g.Group.Id, g.Group) },
        DeviceChanged d => this with { Revision = Revision + 1, Devices = Devices.SetItem(d.Device.Address, d.Device) },
        DeviceRemoved r => this with { Revision = Revision + 1, Devices = Devices.Remove(r.Address) },
        GroupRemoved r => this with { Revision = Revision + 1, Groups = Groups.Remove(r.GroupId) },
        SessionEnded => this with { Revision = Revision + 1 },
        _ => throw new ArgumentOutOfRangeException(nameof(change)),
    };
}

/// <summary>What a watcher receives: a change at a revision, or a whole snapshot.</summary>
/// <param name="Revision">The table's revision once this event is applied.</param>
/// <param name="Change">The change, or null when this is a snapshot.</param>
/// <param name="Snapshot">The whole table (first, and after the watcher fell behind), or null for a change.</param>
public readonly record struct TopologyEvent(ulong Revision, TopologyChange? Change, TopologySnapshot? Snapshot);

/// <summary>
/// The revisioned record of the table, after Kubernetes ListAndWatch: publishers append changes
/// (under the changed group's lock, so one group's changes keep their order), readers take
/// immutable snapshots, and watchers get a snapshot followed by every later change. A watcher
/// whose buffer overflows is never waited for: it is marked and resynchronised with a fresh
/// snapshot when it next reads. The last changes (as many as a watcher may buffer) are kept, so
/// that a watcher that reconnects can resume after the revision it last saw instead of starting
/// over from a snapshot.
/// </summary>
public sealed class TopologyJournal
{
    // Lock 8 of docs/locking.md: a leaf; publishers hold their group's lock (or the hotplug lock) around it.
    private readonly Lock _sync = new();
    private readonly int _watchBuffer;
    // The latest changes, a ring: _history[(_historyStart + i) % length] is the i-th oldest kept.
    private readonly TopologyEvent[] _history;
    private int _historyStart;
    private int _historyCount;
    private TopologySnapshot _current;
    private ImmutableArray<TopologyWatcher> _watchers = [];

    internal TopologyJournal(TopologySnapshot initial, int watchBuffer)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(watchBuffer, 1);
        _current = initial;
        _watchBuffer = watchBuffer;
        _history = new TopologyEvent[watchBuffer];
    }

    /// <summary>The latest snapshot: the table as of the last published change, read without a lock.</summary>
    public TopologySnapshot Current => Volatile.Read(ref _current);

    /// <summary>Watches open now, for operators and leak checks.</summary>
    public int WatcherCount => _watchers.Length;

    /// <summary>
    /// Told of every published group change, the group before and after, in revision order, under
    /// the journal's lock (so it must not block or call back into the broker), after the snapshot
    /// includes the change and before any watcher sees it. Set once, before anything is published:
    /// nothing that changes a group escapes it, whatever path changed it.
    /// </summary>
    internal Action<GroupInfo, GroupInfo>? GroupTransition { get; set; }

    /// <summary>Appends changes in order, one revision each, and hands them to every watcher without blocking.</summary>
    internal void Publish(params ReadOnlySpan<TopologyChange> changes)
    {
        lock (_sync)
        {
            var before = _current;
            var snapshot = before;
            foreach (var change in changes)
                snapshot = snapshot.Apply(change);
            Volatile.Write(ref _current, snapshot);
            try
            {
                if (GroupTransition is { } observer)
                    Report(before, changes, observer);
            }
            finally
            {
                // Watchers get every change even if the observer failed (a broker bug it reports).
                var revision = before.Revision;
                foreach (var change in changes)
                {
                    var ev = new TopologyEvent(++revision, change, null);
                    Remember(ev);
                    foreach (var watcher in _watchers)
                        watcher.Offer(ev);
                }
            }
        }
    }

    private static void Report(TopologySnapshot snapshot, ReadOnlySpan<TopologyChange> changes, Action<GroupInfo, GroupInfo> observer)
    {
        foreach (var change in changes)
        {
            if (change is GroupChanged { Group: var after } && snapshot.Groups.TryGetValue(after.Id, out var before))
                observer(before, after);
            snapshot = snapshot.Apply(change);
        }
    }

    /// <summary>Starts a watch; it begins with the current snapshot.</summary>
    public TopologyWatcher Watch() => Watch(resumeAfter: null);

    /// <summary>
    /// Starts a watch that resumes after revision <paramref name="resumeAfter"/>: it begins with
    /// the changes after it when the journal still keeps them all (none when it is the current
    /// revision), and with the current snapshot otherwise: when it is too old, newer than any
    /// revision yet (another broker's), or null. <see cref="TopologyWatcher.Resumed"/> says which.
    /// </summary>
    public TopologyWatcher Watch(ulong? resumeAfter)
    {
        lock (_sync)
        {
            var missed = resumeAfter is { } after ? ChangesAfter(after) : null;
            var watcher = missed is null
                ? new TopologyWatcher(this, _watchBuffer, _current, [])
                : new TopologyWatcher(this, _watchBuffer, null, missed.Value);
            _watchers = _watchers.Add(watcher);
            return watcher;
        }
    }

    /// <summary>The latest changes kept, at most <paramref name="count"/>, oldest first: what just happened, for views.</summary>
    public ImmutableArray<TopologyEvent> Recent(int count)
    {
        lock (_sync)
            return Latest(Math.Clamp(count, 0, _historyCount));
    }

    // Under _sync.
    private void Remember(TopologyEvent ev)
    {
        if (_historyCount < _history.Length)
        {
            _history[(_historyStart + _historyCount++) % _history.Length] = ev;
        }
        else
        {
            _history[_historyStart] = ev;
            _historyStart = (_historyStart + 1) % _history.Length;
        }
    }

    // Under _sync: the kept changes after a revision, or null when some of them are no longer kept.
    private ImmutableArray<TopologyEvent>? ChangesAfter(ulong revision)
    {
        var current = _current.Revision;
        // Changes are kept for revisions current - count + 1 .. current, one revision each.
        if (revision > current || current - revision > (ulong)_historyCount)
            return null;
        return Latest((int)(current - revision));
    }

    // Under _sync: the last count changes kept, oldest first.
    private ImmutableArray<TopologyEvent> Latest(int count)
    {
        var changes = ImmutableArray.CreateBuilder<TopologyEvent>(count);
        for (var i = _historyCount - count; i < _historyCount; i++)
            changes.Add(_history[(_historyStart + i) % _history.Length]);
        return changes.MoveToImmutable();
    }

    internal TopologySnapshot Resync(TopologyWatcher watcher)
    {
        lock (_sync)
        {
            watcher.DiscardBuffered();
            return _current;
        }
    }

    internal void Remove(TopologyWatcher watcher)
    {
        lock (_sync)
            _watchers = _watchers.Remove(watcher);
    }
}

/// <summary>One watch: a snapshot (or the changes missed since a revision), then changes in order; disposing it stops it.</summary>
public sealed class TopologyWatcher : IDisposable
{
    private readonly TopologyJournal _journal;
    private readonly Channel<TopologyEvent> _events;
    private TopologySnapshot? _initial;
    private ImmutableArray<TopologyEvent> _missed;
    private volatile bool _overflowed;

    internal TopologyWatcher(TopologyJournal journal, int capacity, TopologySnapshot? initial, ImmutableArray<TopologyEvent> missed)
    {
        _journal = journal;
        _initial = initial;
        _missed = missed;
        Resumed = initial is null;
        _events = Channel.CreateBounded<TopologyEvent>(new BoundedChannelOptions(capacity)
        {
            SingleReader = true,
            SingleWriter = false,
            FullMode = BoundedChannelFullMode.Wait,
        });
    }

    /// <summary>How many times this watcher fell behind and was resynchronised.</summary>
    public int Resyncs { get; private set; }

    /// <summary>True when the watch resumed after a revision (it begins with the changes since); false when it begins with a snapshot.</summary>
    public bool Resumed { get; }

    // Called under the journal lock.
    internal void Offer(TopologyEvent ev)
    {
        if (!_overflowed && !_events.Writer.TryWrite(ev))
            _overflowed = true;
    }

    // Called under the journal lock: everything buffered is older than the snapshot that replaces it.
    internal void DiscardBuffered()
    {
        while (_events.Reader.TryRead(out _))
        {
        }
        _overflowed = false;
    }

    /// <summary>The events: first a snapshot (or the changes missed), then changes; a fresh snapshot after an overflow.</summary>
    public async IAsyncEnumerable<TopologyEvent> ReadAllAsync([EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        if (_initial is { } initial)
        {
            _initial = null;
            yield return new TopologyEvent(initial.Revision, null, initial);
        }
        var missed = _missed;
        _missed = [];
        foreach (var ev in missed)
            yield return ev;
        var reader = _events.Reader;
        while (true)
        {
            if (_overflowed)
            {
                var snapshot = _journal.Resync(this);
                Resyncs++;
                yield return new TopologyEvent(snapshot.Revision, null, snapshot);
                continue;
            }
            if (reader.TryRead(out var ev))
            {
                yield return ev;
                continue;
            }
            if (!await reader.WaitToReadAsync(cancellationToken).ConfigureAwait(false))
                yield break;
        }
    }

    /// <summary>Stops the watch: the journal forgets it and its reader sees the end.</summary>
    public void Dispose()
    {
        _journal.Remove(this);
        _events.Writer.TryComplete();
    }
}
