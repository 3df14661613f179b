namespace DmaBroker.Core.Faults;

/// <summary>
/// One injected fault: its settings, and how often it has fired. Each matching event of its device
/// asks it once (<see cref="TryFire"/>); with a probability under 100 each ask draws from a
/// pseudo-random sequence seeded with <see cref="FaultSettings.Seed"/>, so the same events replay
/// the same firings.
/// </summary>
public sealed class InjectedFault
{
    // The fault lock (lock 10 of docs/locking.md): a leaf, taken under the device model's lock.
    private readonly Lock _sync = new();
    private readonly Random? _draws;
    private long _fired;
    private bool _spent;

    internal InjectedFault(ulong id, PciAddress address, FaultSettings settings)
    {
        Id = id;
        Address = address;
        Settings = settings;
        // Random(int) is the classic, stable sequence for a given seed; the seed's 64 bits fold into it.
        _draws = settings.Probability < 100 ? new Random(unchecked((int)(settings.Seed ^ (settings.Seed >> 32)))) : null;
    }

    /// <summary>The fault's id, unique in the broker, from 1.</summary>
    public ulong Id { get; }

    /// <summary>The device it was injected on.</summary>
    public PciAddress Address { get; }

    /// <summary>How it was set.</summary>
    public FaultSettings Settings { get; }

    /// <summary>How many events it has fired on.</summary>
    public long Fired
    {
        get
        {
            lock (_sync)
                return _fired;
        }
    }

    /// <summary>It fires no more: its count is reached, or it acted at once.</summary>
    public bool Spent
    {
        get
        {
            lock (_sync)
                return _spent;
        }
    }

    /// <summary>One matching event: true when the fault fires on it (and counts it).</summary>
    internal bool TryFire()
    {
        lock (_sync)
        {
            if (_spent)
                return false;
            if (_draws is not null && _draws.Next(100) >= Settings.Probability)
                return false;
            _fired++;
            _spent = Settings.Count != 0 && _fired >= Settings.Count;
            return true;
        }
    }

    /// <summary>A fault that acts at once has acted: fired once, and spent.</summary>
    internal void Acted()
    {
        lock (_sync)
        {
            _fired = 1;
            _spent = true;
        }
    }

    /// <summary>Whether DEVICE_ERROR's filters (opcode, LBA range) let <paramref name="command"/> through; an unfiltered fault matches every event.</summary>
    internal bool Matches(in CommandEvent? command)
    {
        var s = Settings;
        if (s.Opcode is null && s.LbaCount == 0)
            return true;
        if (command is not { } c)
            return false;
        if (s.Opcode is { } opcode && (!c.Io || c.Opcode != opcode))
            return false;
        if (s.LbaCount != 0 && (c.FirstLba is not { } first || first >= s.LbaStart + s.LbaCount || s.LbaStart >= first + c.Blocks))
            return false;
        return true;
    }
}
