using DmaBroker.Core.Faults;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Devices;

/// <summary>
/// QEMU's educational device (hw/misc/edu.c, docs/specs/edu.rst): identification, liveness,
/// factorial, interrupt raise/acknowledge, and a DMA engine with a 4 KiB buffer at device
/// address 0x40000 and a 28-bit DMA mask. A DMA runs from a timer, as QEMU's dma_timer, after
/// the spec's <see cref="PciFunctionSpec.DmaLatencyUs"/> on <paramref name="time"/>: until then the
/// command's start bit reads set (docs/edu.md). A range outside the buffer fails the command write
/// where QEMU would log and overrun its buffer.
/// </summary>
internal sealed class EduDevice(PciFunctionSpec spec, TimeProvider time) : DeviceModel(spec)
{
    public const ulong Bar0Size = 1 << 20;
    public const uint Identification = 0x010000ed;
    public const ulong DmaStart = 0x40000;
    public const int DmaSize = 4096;
    public const ulong DefaultDmaMask = (1UL << 28) - 1;

    public const ulong RegId = 0x00;
    public const ulong RegLiveness = 0x04;
    public const ulong RegFactorial = 0x08;
    public const ulong RegStatus = 0x20;
    public const ulong RegIrqStatus = 0x24;
    public const ulong RegIrqRaise = 0x60;
    public const ulong RegIrqAck = 0x64;
    public const ulong RegDmaSource = 0x80;
    public const ulong RegDmaDestination = 0x88;
    public const ulong RegDmaCount = 0x90;
    public const ulong RegDmaCommand = 0x98;

    public const uint StatusComputing = 0x01;
    public const uint StatusIrqFactorial = 0x80;
    public const ulong DmaCommandStart = 0x1;
    public const ulong DmaCommandToRam = 0x2;
    public const ulong DmaCommandIrq = 0x4;
    public const uint DmaIrq = 0x100;
    public const uint FactorialIrq = 0x001;

    private static readonly ulong[] Bars = [Bar0Size, 0, 0, 0, 0, 0];

    private readonly byte[] _buffer = new byte[DmaSize];
    private uint _liveness;
    private uint _factorial;
    private uint _status;
    private uint _irqStatus;
    private ulong _dmaSource;
    private ulong _dmaDestination;
    private ulong _dmaCount;
    private ulong _dmaCommand;
    private Transfer? _transfer;

    public override IReadOnlyList<ulong> BarSizes => Bars;

    public ulong DmaMask { get; init; } = DefaultDmaMask;

    /// <summary>How long a DMA runs from the command that starts it to its completion.</summary>
    public TimeSpan DmaLatency { get; } = TimeSpan.FromMicroseconds(spec.DmaLatencyUs);

    /// <summary>The device's buffer, for tests that look inside the device.</summary>
    public ReadOnlySpan<byte> Buffer => _buffer;

    public override ulong MmioRead(int bar, ulong offset, int width)
    {
        if (bar != 0 || !ValidWidth(offset, width))
            return ulong.MaxValue;
        return offset switch
        {
            RegId => Identification,
            RegLiveness => _liveness,
            RegFactorial => _factorial,
            RegStatus => _status,
            RegIrqStatus => _irqStatus,
            RegDmaSource => _dmaSource,
            RegDmaDestination => _dmaDestination,
            RegDmaCount => _dmaCount,
            RegDmaCommand => _dmaCommand,
            _ => ulong.MaxValue,
        };
    }

    public override MmioResult MmioWrite(int bar, ulong offset, int width, ulong value, IDevicePort port)
    {
        if (bar != 0 || !ValidWidth(offset, width))
            return MmioResult.Done; // QEMU ignores such writes
        switch (offset)
        {
            case RegLiveness:
                // Stored inverted, as QEMU's addr4 is: a fresh or reset device reads 0, not ~0.
                _liveness = ~(uint)value;
                break;
            case RegFactorial:
                if ((_status & StatusComputing) == 0)
                {
                    _factorial = Factorial((uint)value);
                    if ((_status & StatusIrqFactorial) != 0)
                        Raise(FactorialIrq, port);
                }
                break;
            case RegStatus:
                _status = ((uint)value & StatusIrqFactorial) != 0 ? _status | StatusIrqFactorial : _status & ~StatusIrqFactorial;
                break;
            case RegIrqRaise:
                Raise((uint)value, port);
                break;
            case RegIrqAck:
                _irqStatus &= ~(uint)value;
                break;
            case RegDmaSource when (_dmaCommand & DmaCommandStart) == 0:
                _dmaSource = value;
                break;
            case RegDmaDestination when (_dmaCommand & DmaCommandStart) == 0:
                _dmaDestination = value;
                break;
            case RegDmaCount when (_dmaCommand & DmaCommandStart) == 0:
                _dmaCount = value;
                break;
            // A start while one runs is ignored, as QEMU's dma_rw ignores it.
            case RegDmaCommand when (value & DmaCommandStart) != 0 && (_dmaCommand & DmaCommandStart) == 0:
                return StartDma(value, port);
        }
        return MmioResult.Done;
    }

    protected override void ResetRegisters()
    {
        Array.Clear(_buffer);
        _liveness = _factorial = _status = _irqStatus = 0;
        _dmaSource = _dmaDestination = _dmaCount = _dmaCommand = 0;
        // A transfer in flight is dropped: its timer may still fire, but finds itself no longer the current one.
        _transfer?.Timer?.Dispose();
        _transfer = null;
    }

    /// <summary>
    /// Starts a DMA: the start bit stays set until the timer runs it. A range outside the buffer is
    /// refused here rather than then, since the DMA registers cannot change while it runs.
    /// </summary>
    private MmioResult StartDma(ulong command, IDevicePort port)
    {
        var (deviceAddress, count) = ((command & DmaCommandToRam) != 0 ? _dmaSource : _dmaDestination, _dmaCount);
        if (deviceAddress < DmaStart || count > DmaSize || deviceAddress - DmaStart > (ulong)DmaSize - count)
        {
            _dmaCommand = command & ~DmaCommandStart;
            return MmioResult.Failed($"edu: DMA range [0x{deviceAddress:x}, +0x{count:x}) is outside the device buffer [0x{DmaStart:x}, 0x{DmaStart + DmaSize:x})");
        }
        // Fault injection (SPEC §14): DEVICE_ERROR fails the DMA as its command is written, as a bad range does; nothing moves.
        if (Faults.Any && Faults.Fire(FaultKind.DeviceError) is { } injected)
        {
            _dmaCommand = command & ~DmaCommandStart;
            return MmioResult.Failed($"edu: DMA failed: device error injected (fault {injected.Id})");
        }
        _dmaCommand = command;
        var transfer = new Transfer(this, port);
        _transfer = transfer;
        transfer.Timer = time.CreateTimer(static t => ((Transfer)t!).Fire(), transfer, DmaLatency, Timeout.InfiniteTimeSpan);
        return MmioResult.Done;
    }

    /// <summary>
    /// The DMA timer's work, under the model's lock: the transfer through the IOMMU, then the start
    /// bit clears and the interrupt is raised if asked for. A fault (posted by the port, SPEC §6)
    /// ends the DMA just the same, as in QEMU, where the bus drops what it cannot deliver.
    /// </summary>
    private void FinishDma(Transfer transfer, IDevicePort port)
    {
        if (_transfer != transfer)
            return;
        _transfer = null;
        transfer.Timer?.Dispose();
        var toRam = (_dmaCommand & DmaCommandToRam) != 0;
        var buffer = _buffer.AsSpan((int)((toRam ? _dmaSource : _dmaDestination) - DmaStart), (int)_dmaCount);
        _ = toRam ? port.Write(_dmaDestination & DmaMask, buffer) : port.Read(_dmaSource & DmaMask, buffer);
        _dmaCommand &= ~DmaCommandStart;
        if ((_dmaCommand & DmaCommandIrq) != 0)
            Raise(DmaIrq, port);
    }

    private void Raise(uint bits, IDevicePort port)
    {
        _irqStatus |= bits;
        // As QEMU's edu_raise_irq: MSI fires only while some interrupt status bit is set.
        if (_irqStatus != 0)
            port.Interrupt(0);
    }

    /// <summary>One started DMA, from its command until its timer fires or a reset drops it.</summary>
    private sealed class Transfer(EduDevice device, IDevicePort port)
    {
        private readonly EduDevice _device = device;

        public ITimer? Timer { get; set; }

        // On a timer thread, holding nothing: the port takes the operation scope and the model's lock.
        public void Fire() => port.TryRun(static (t, p) => t._device.FinishDma(t, p), this);
    }

    private static bool ValidWidth(ulong offset, int width) => offset < 0x80 ? width == 4 : width is 4 or 8;

    private static uint Factorial(uint n)
    {
        // 34! holds 2^32, so from there on the 32-bit result is 0: no reason to loop 4 billion times.
        if (n >= 34)
            return 0;
        uint result = 1;
        while (n > 0)
            result *= n--;
        return result;
    }
}
