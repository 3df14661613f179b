using System.Buffers.Binary;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Devices;

/// <summary>What a device can do to the host: DMA through the IOMMU and interrupts.</summary>
internal interface IDevicePort
{
    /// <summary>The device writes host memory (inbound DMA).</summary>
    DmaOutcome Write(ulong iova, ReadOnlySpan<byte> data);

    /// <summary>
    /// The device writes <paramref name="length"/> bytes at <paramref name="iova"/> that
    /// <paramref name="fill"/> produces in place (from the device's own storage: one copy, not two),
    /// with the same translation, checks and fault as <see cref="Write(ulong, ReadOnlySpan{byte})"/>:
    /// every page is checked before fill runs.
    /// </summary>
    DmaOutcome Write<TState>(ulong iova, int length, DmaFill<TState> fill, TState state);

    /// <summary>The device reads host memory (outbound DMA).</summary>
    DmaOutcome Read(ulong iova, Span<byte> destination);

    /// <summary>The device signals an MSI vector.</summary>
    void Interrupt(uint vector);

    /// <summary>
    /// Runs device work that a register write left for later (a timer firing) as the write itself
    /// ran: in the session's operation scope and under the model's lock, with this port. Runs
    /// nothing, and returns false, once the handle is closed or its session is ending.
    /// </summary>
    bool TryRun<TState>(Action<TState, IDevicePort> work, TState state);

    /// <summary>
    /// Queues device work to run later on the broker's device engines (<see cref="DeviceEngines"/>),
    /// as <see cref="TryRun"/> runs it: a device that keeps working on its own (an NVMe controller
    /// fetching from shadow doorbells) continues there instead of holding its lock. False when there
    /// are no engines to queue it on (then the caller goes on itself).
    /// </summary>
    bool Post<TState>(Action<TState, IDevicePort> work, TState state);
}

/// <summary>The result of a register write that may have started device work.</summary>
/// <param name="Ok">The write, and any DMA it started, went through.</param>
/// <param name="Dma">The outcome of the DMA the write started: a fault also goes to the session's events.</param>
/// <param name="Error">Why the device itself failed the work (bad programming), or null.</param>
public readonly record struct MmioResult(bool Ok, DmaOutcome Dma, string? Error)
{
    /// <summary>The write went through, and any DMA it started too.</summary>
    public static readonly MmioResult Done = new(true, DmaOutcome.Success, null);

    /// <summary>The device refused the work it was programmed for; the broker keeps running where QEMU would abort.</summary>
    public static MmioResult Failed(string error) => new(false, DmaOutcome.Success, error);
}

/// <summary>
/// A simulated PCI function: a config space (VFIO region 7) whose command register gates DMA,
/// and up to six BARs (regions 0-5). Callers hold <see cref="Sync"/> around every access.
/// </summary>
internal abstract class DeviceModel
{
    public const int ConfigIndex = 7;
    public const int ConfigSize = 256;
    public const ushort CommandMemory = 1 << 1;
    public const ushort CommandBusMaster = 1 << 2;
    private const int CommandOffset = 0x04;

    private readonly byte[] _config = new byte[ConfigSize];
    private volatile bool _busMaster;

    protected DeviceModel(PciFunctionSpec spec)
    {
        Spec = spec;
        ResetConfig();
    }

    /// <summary>
    /// The device's lock (lock 4 of <c>docs/locking.md</c>), held for a whole register access or
    /// device DMA: taken after its group's lock, before the IOVA space the DMA translates through.
    /// </summary>
    internal readonly Lock Sync = new();

    public PciFunctionSpec Spec { get; }

    /// <summary>The faults injected on this device (SPEC §14), which the model and its handles consult at their hook points.</summary>
    public DeviceFaults Faults { get; } = new();

    /// <summary>Sizes of BAR0-BAR5 in bytes; 0 for an absent BAR.</summary>
    public abstract IReadOnlyList<ulong> BarSizes { get; }

    /// <summary>Command register bit 2: without it the device may not initiate DMA.</summary>
    public bool BusMaster => _busMaster;

    /// <summary>The size of a region (0-5 BARs, 7 config), or 0 if the device has no such region.</summary>
    public ulong RegionSize(uint index) => index switch
    {
        < 6 => BarSizes[(int)index],
        ConfigIndex => ConfigSize,
        _ => 0,
    };

    public void ConfigRead(int offset, Span<byte> destination) => _config.AsSpan(offset, destination.Length).CopyTo(destination);

    /// <summary>
    /// Config writes reach only the command register (and the interrupt line); everything else is
    /// read-only, as VFIO virtualises it.
    /// </summary>
    public void ConfigWrite(int offset, ReadOnlySpan<byte> data)
    {
        for (var i = 0; i < data.Length; i++)
        {
            var at = offset + i;
            if (at is CommandOffset or CommandOffset + 1 or 0x3c)
                _config[at] = data[i];
        }
        _busMaster = (BinaryPrimitives.ReadUInt16LittleEndian(_config.AsSpan(CommandOffset)) & CommandBusMaster) != 0;
    }

    /// <summary>A driver's register read of <paramref name="width"/> bytes (1, 2, 4 or 8).</summary>
    public abstract ulong MmioRead(int bar, ulong offset, int width);

    /// <summary>A driver's register write; may start device work that uses <paramref name="port"/>.</summary>
    public abstract MmioResult MmioWrite(int bar, ulong offset, int width, ulong value, IDevicePort port);

    /// <summary>
    /// Whether a write to BAR <paramref name="bar"/> at <paramref name="offset"/> can set the device
    /// to heavy work before it returns (an NVMe doorbell runs the commands it posted): such a write
    /// runs on the broker's device engines (<see cref="DeviceEngines"/>), below the control plane.
    /// No register by default.
    /// </summary>
    public virtual bool StartsWork(int bar, ulong offset) => false;

    /// <summary>Function-level reset: registers cleared, Bus Master off.</summary>
    public void Reset()
    {
        ResetConfig();
        ResetRegisters();
    }

    protected abstract void ResetRegisters();

    private void ResetConfig()
    {
        Array.Clear(_config);
        var c = _config.AsSpan();
        BinaryPrimitives.WriteUInt16LittleEndian(c[0x00..], Spec.VendorId);
        BinaryPrimitives.WriteUInt16LittleEndian(c[0x02..], Spec.DeviceId);
        c[0x08] = 0x10; // revision
        c[0x09] = (byte)Spec.ClassCode;
        c[0x0a] = (byte)(Spec.ClassCode >> 8);
        c[0x0b] = (byte)(Spec.ClassCode >> 16);
        c[0x0e] = (byte)(Spec.IsBridge ? 0x01 : 0x00);
        c[0x3d] = 0x01; // INTA
        _busMaster = false;
    }

    /// <summary>The endpoint models that can be hot-added (bridges cannot).</summary>
    public static IReadOnlyList<string> EndpointModels { get; } = ["edu", "nvme", "nic", "gpu", "audio"];

    /// <summary>The model for a function, by its <c>model</c> name; a model that takes time takes it from <paramref name="time"/>.</summary>
    public static DeviceModel Create(PciFunctionSpec spec, TimeProvider time) => spec.Model switch
    {
        "edu" => new EduDevice(spec, time),
        "nvme" => new NvmeController(spec),
        "nic" => new RegisterFileDevice(spec, 128 * 1024),
        "gpu" => new RegisterFileDevice(spec, 16 * 1024 * 1024),
        "audio" => new RegisterFileDevice(spec, 16 * 1024),
        _ => new RegisterFileDevice(spec, 0),
    };
}

/// <summary>A device whose BAR0 is plain registers that read back what was written (or no BAR at all).</summary>
internal sealed class RegisterFileDevice(PciFunctionSpec spec, ulong bar0Size) : DeviceModel(spec)
{
    private readonly Dictionary<ulong, byte> _bytes = [];
    private readonly ulong[] _bars = [bar0Size, 0, 0, 0, 0, 0];

    public override IReadOnlyList<ulong> BarSizes => _bars;

    public override ulong MmioRead(int bar, ulong offset, int width)
    {
        ulong value = 0;
        for (var i = width - 1; i >= 0; i--)
            value = (value << 8) | _bytes.GetValueOrDefault(offset + (ulong)i);
        return value;
    }

    public override MmioResult MmioWrite(int bar, ulong offset, int width, ulong value, IDevicePort port)
    {
        for (var i = 0; i < width; i++)
            _bytes[offset + (ulong)i] = (byte)(value >> (8 * i));
        return MmioResult.Done;
    }

    protected override void ResetRegisters() => _bytes.Clear();
}
