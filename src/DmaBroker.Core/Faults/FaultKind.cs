namespace DmaBroker.Core.Faults;

/// <summary>What an injected fault does to its device (SPEC §14).</summary>
public enum FaultKind
{
    /// <summary>The device's next DMA accesses fault as UNMAPPED although mapped; nothing moves.</summary>
    IommuFault = 1,
    /// <summary>The device's next operations fail: an edu DMA ends with an error, an NVMe command completes with an injected status.</summary>
    DeviceError,
    /// <summary>The device's next interrupts are dropped.</summary>
    DropInterrupt,
    /// <summary>The device's next interrupts arrive late, on the broker's clock.</summary>
    DelayInterrupt,
    /// <summary>The device's next resets take a while: an FLR returns late, NVMe CSTS.RDY rises late.</summary>
    SlowReset,
    /// <summary>The device disappears at once, even while owned.</summary>
    SurpriseRemove,
    /// <summary>The connection of the session that owns the device is cut at once.</summary>
    LinkDown,
}

/// <summary>How an injected fault is set (SPEC §14); <see cref="FaultSettings.Validate"/> says which settings a kind takes.</summary>
/// <param name="Kind">What the fault does.</param>
public sealed record FaultSettings(FaultKind Kind)
{
    /// <summary>The longest delay a fault may carry: ten minutes.</summary>
    public static readonly TimeSpan MaxDelay = TimeSpan.FromMinutes(10);

    /// <summary>How many matching events fire before the fault is spent; 0 = until cleared.</summary>
    public uint Count { get; init; }

    /// <summary>How late a delayed interrupt arrives, how long a slow reset takes.</summary>
    public TimeSpan Delay { get; init; }

    /// <summary>The NVMe Status Field a DEVICE_ERROR completes commands with; 0 = Data Transfer Error.</summary>
    public uint Status { get; init; }

    /// <summary>The share of matching events that fire, 1 to 100.</summary>
    public int Probability { get; init; } = 100;

    /// <summary>The seed of the draws, so a run replays exactly.</summary>
    public ulong Seed { get; init; }

    /// <summary>NVMe DEVICE_ERROR only: match only I/O commands with this opcode.</summary>
    public uint? Opcode { get; init; }

    /// <summary>NVMe DEVICE_ERROR only: the first LBA of the range a Read or Write must overlap.</summary>
    public ulong LbaStart { get; init; }

    /// <summary>NVMe DEVICE_ERROR only: the LBAs in that range; 0 = no LBA filter.</summary>
    public ulong LbaCount { get; init; }

    /// <summary>True for the kinds that act once, at injection, rather than on later events.</summary>
    public bool ActsAtOnce => Kind is FaultKind.SurpriseRemove or FaultKind.LinkDown;

    /// <summary>
    /// Checks the settings for a device of <paramref name="model"/>: EINVAL for an unknown kind, a
    /// probability outside 1-100, a missing or too long delay where the kind needs one, any setting
    /// the kind (or the model) does not use.
    /// </summary>
    public void Validate(string model)
    {
        if (!Enum.IsDefined(Kind))
            throw ErrnoException.Invalid($"fault kind {(int)Kind} is not one of {string.Join(", ", Enum.GetNames<FaultKind>())}");
        if (Probability is < 1 or > 100)
            throw ErrnoException.Invalid($"probability_percent is 1 to 100 (0 reads as 100), not {Probability}");
        var delayed = Kind is FaultKind.DelayInterrupt or FaultKind.SlowReset;
        if (delayed && (Delay <= TimeSpan.Zero || Delay > MaxDelay))
            throw ErrnoException.Invalid($"{Kind} needs delay_ms from 1 to {MaxDelay.TotalMilliseconds:0}, not {Delay.TotalMilliseconds:0}");
        if (!delayed && Delay != TimeSpan.Zero)
            throw ErrnoException.Invalid($"{Kind} takes no delay_ms");
        if (ActsAtOnce && (Count != 0 || Probability != 100 || Seed != 0))
            throw ErrnoException.Invalid($"{Kind} acts once, at injection: it takes no count, probability_percent or seed");
        var filtered = Status != 0 || Opcode is not null || LbaCount != 0 || LbaStart != 0;
        if (filtered && (Kind != FaultKind.DeviceError || model != "nvme"))
            throw ErrnoException.Invalid($"status, opcode and the LBA range narrow DEVICE_ERROR on an nvme device only, not {Kind} on {model}");
        if (Status > 0x7fff)
            throw ErrnoException.Invalid($"status is the 15-bit NVMe Status Field, 1 to 0x7fff, not 0x{Status:x}");
        if (Opcode > 0xff)
            throw ErrnoException.Invalid($"an NVMe opcode is 0 to 255, not {Opcode}");
        if (LbaCount == 0 && LbaStart != 0)
            throw ErrnoException.Invalid("lba_start needs lba_count");
        if (LbaCount != 0 && LbaStart > ulong.MaxValue - LbaCount)
            throw ErrnoException.Invalid($"the LBA range [{LbaStart}, +{LbaCount}) wraps around");
        if (Kind == FaultKind.DeviceError && model is not ("edu" or "nvme"))
            throw ErrnoException.Invalid($"DEVICE_ERROR needs a device that runs operations (edu, nvme), not {model}");
    }
}

/// <summary>One NVMe command as DEVICE_ERROR's filters see it.</summary>
/// <param name="Io">It came from an I/O queue (1-64), not the admin queue.</param>
/// <param name="Opcode">Its opcode.</param>
/// <param name="FirstLba">For a Read or Write, its first LBA; null for every other command.</param>
/// <param name="Blocks">For a Read or Write, how many LBAs it covers.</param>
internal readonly record struct CommandEvent(bool Io, byte Opcode, ulong? FirstLba, ulong Blocks);
