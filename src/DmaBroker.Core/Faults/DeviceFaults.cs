namespace DmaBroker.Core.Faults;

/// <summary>
/// The faults armed on one device, which its model and its handles consult at the hook points
/// (docs/nvme.md, "Where fault injection hooks in"). With none armed a hook costs one volatile read.
/// The array is replaced whole under the fault lock and read without it.
/// </summary>
internal sealed class DeviceFaults
{
    // Part of the fault lock (lock 10 of docs/locking.md): a leaf, guards arming and the pending delays.
    private readonly Lock _sync = new();
    private readonly HashSet<ITimer> _pending = [];
    private volatile InjectedFault[] _armed = [];

    /// <summary>Any fault is armed: the hooks' fast path.</summary>
    public bool Any => _armed.Length != 0;

    /// <summary>The broker's clock, for delays and late ready; set when a fault is armed.</summary>
    public TimeProvider Time { get; private set; } = TimeProvider.System;

    public void Arm(InjectedFault fault, TimeProvider time)
    {
        lock (_sync)
        {
            Time = time;
            _armed = [.. _armed, fault];
        }
    }

    /// <summary>Disarms the faults <paramref name="remove"/> picks.</summary>
    public void Disarm(Func<InjectedFault, bool> remove)
    {
        lock (_sync)
            _armed = [.. _armed.Where(f => !remove(f))];
    }

    /// <summary>
    /// One event of <paramref name="kind"/> (for DEVICE_ERROR on NVMe, <paramref name="command"/>):
    /// the armed faults of that kind that match it are asked in injection order, and the first that
    /// fires takes it. Null when none fires.
    /// </summary>
    public InjectedFault? Fire(FaultKind kind, CommandEvent? command = null)
    {
        foreach (var fault in _armed)
        {
            if (fault.Settings.Kind == kind && fault.Matches(command) && fault.TryFire())
                return fault;
        }
        return null;
    }

    /// <summary>Runs <paramref name="action"/> after <paramref name="delay"/> on <see cref="Time"/> (a delayed interrupt).</summary>
    public void Later(TimeSpan delay, Action action)
    {
        lock (_sync)
        {
            ITimer? timer = null;
            timer = Time.CreateTimer(_ =>
            {
                lock (_sync)
                {
                    // The timer may fire before the assignment below has been seen: then it is not pending yet.
                    if (timer is null || !_pending.Remove(timer))
                        return;
                }
                timer.Dispose();
                action();
            }, null, Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
            // Kept referenced until it fires, and started only once it is, so the callback always finds it.
            _pending.Add(timer);
            timer.Change(delay, Timeout.InfiniteTimeSpan);
        }
    }
}
