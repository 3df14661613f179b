using System.Buffers;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Telemetry;

namespace DmaBroker.Core.Vfio;

/// <summary>
/// An open device (a VFIO device fd): the driver's register accesses, and the DMA the device
/// performs, always translated through the domain attached to the device's group at that instant.
/// Every access runs inside the session's operation scope and under the device model's lock, so
/// session teardown and CloseDevice both wait out accesses in flight.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "The removal token source has no timer; it lives as long as the handle, and DMA streams link to its token, so it is never disposed early.")]
public sealed class DeviceHandle : IDevicePort
{
    /// <summary>The largest single device access (read, write, copy).</summary>
    public const int MaxTransfer = SessionMemory.MaxTransfer;

    private readonly BrokerMetrics _metrics;
    private readonly DeviceEngines? _engines;
    private readonly CancellationTokenSource _removed = new();
    private Action<uint>? _interruptListener;

    internal DeviceHandle(ulong id, PciDevice device, Session session, BrokerMetrics metrics, DeviceEngines? engines = null)
    {
        Id = id;
        Device = device;
        Session = session;
        _metrics = metrics;
        _engines = engines;
    }

    /// <summary>The handle's number, as a DMA stream's <c>open</c> and the device calls name it.</summary>
    public ulong Id { get; }

    /// <summary>The PCI function the handle opens.</summary>
    public PciDevice Device { get; }

    /// <summary>The session that opened it: its memory is all the device's DMA can reach, and its events carry the faults.</summary>
    public Session Session { get; }
    internal bool Closed { get; set; }

    /// <summary>Set (under the model's lock) when the device was surprise-removed: every access fails ENODEV.</summary>
    internal bool Gone { get; private set; }

    /// <summary>Cancelled when the device is surprise-removed (SPEC §14), so a DMA stream on the handle ends with ENODEV.</summary>
    public CancellationToken Removed => _removed.Token;

    /// <summary>The device was surprise-removed; call under the model's lock, so no access is in flight.</summary>
    internal void MarkGone()
    {
        Gone = true;
        _removed.Cancel();
    }

    private DeviceModel Model => Device.Model;

    /// <summary>Also tells <paramref name="listener"/> of the device's interrupts (a DMA stream); null stops it.</summary>
    public void SetInterruptListener(Action<uint>? listener) => Volatile.Write(ref _interruptListener, listener);

    /// <summary>Stops <paramref name="listener"/>, unless another has replaced it meanwhile.</summary>
    public void ClearInterruptListener(Action<uint> listener) => Interlocked.CompareExchange(ref _interruptListener, null, listener);

    /// <summary>The device writes host memory at <paramref name="iova"/>.</summary>
    public DmaOutcome DmaWrite(ulong iova, ReadOnlySpan<byte> data)
    {
        CheckLength(data.Length);
        using var op = Session.Enter();
        lock (Model.Sync)
        {
            CheckOpen();
            return Write(iova, data);
        }
    }

    /// <summary>The device reads host memory at <paramref name="iova"/> into <paramref name="destination"/>.</summary>
    public DmaOutcome DmaRead(ulong iova, Span<byte> destination)
    {
        CheckLength(destination.Length);
        using var op = Session.Enter();
        lock (Model.Sync)
        {
            CheckOpen();
            return Read(iova, destination);
        }
    }

    /// <summary>The device's copy engine: every page of both ranges is checked before a byte moves.</summary>
    public DmaOutcome DmaCopy(ulong sourceIova, ulong destinationIova, int length)
    {
        CheckLength(length);
        using var op = Session.Enter();
        lock (Model.Sync)
        {
            CheckOpen();
            if (CurrentSpace(sourceIova, DmaAccess.Read, out var refused) is not { } space)
                return Report(refused, DmaAccess.Read, length);
            var buffer = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                var outcome = space.DeviceCopy(sourceIova, destinationIova, buffer.AsSpan(0, length));
                // The copy engine's two accesses: it reads the source, then writes the destination.
                if (outcome.Ok)
                    _metrics.DmaMoved(DmaAccess.Read, length);
                return Report(outcome, DmaAccess.Write, length);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }
    }

    /// <summary>A register read by the driver: region 0-5 (BAR, width 1/2/4/8) or 7 (config).</summary>
    public ulong MmioRead(uint index, ulong offset, uint width)
    {
        CheckAccess(index, offset, width, mmio: true);
        using var op = Session.Enter();
        lock (Model.Sync)
        {
            CheckOpen();
            if (index == DeviceModel.ConfigIndex)
            {
                Span<byte> bytes = stackalloc byte[8];
                bytes.Clear();
                Model.ConfigRead((int)offset, bytes[..(int)width]);
                return BitConverter.ToUInt64(bytes);
            }
            // The bus carries only the bytes accessed: a 4-byte read of a 64-bit register sees its low half.
            return Model.MmioRead((int)index, offset, (int)width) & WidthMask(width);
        }
    }

    /// <summary>A register write by the driver; it may start device DMA, whose outcome it returns.</summary>
    public MmioResult MmioWrite(uint index, ulong offset, uint width, ulong value)
    {
        CheckAccess(index, offset, width, mmio: true);
        using var op = Session.Enter();
        lock (Model.Sync)
        {
            CheckOpen();
            if (index == DeviceModel.ConfigIndex)
            {
                Span<byte> bytes = stackalloc byte[8];
                BitConverter.TryWriteBytes(bytes, value);
                Model.ConfigWrite((int)offset, bytes[..(int)width]);
                return MmioResult.Done;
            }
            return Model.MmioWrite((int)index, offset, (int)width, value & WidthMask(width), this);
        }
    }

    /// <summary>Reads a region: config space in any size, a BAR as one register access.</summary>
    internal byte[] RegionRead(uint index, ulong offset, uint size)
    {
        if (index == DeviceModel.ConfigIndex)
        {
            CheckAccess(index, offset, size, mmio: false);
            using var op = Session.Enter();
            lock (Model.Sync)
            {
                CheckOpen();
                var data = new byte[size];
                Model.ConfigRead((int)offset, data);
                return data;
            }
        }
        var value = MmioRead(index, offset, size);
        var bytes = BitConverter.GetBytes(value);
        return bytes[..(int)size];
    }

    /// <summary>Whether a write to region <paramref name="index"/> at <paramref name="offset"/> can set the device to heavy work (<see cref="DeviceModel.StartsWork"/>).</summary>
    internal bool StartsWork(uint index, ulong offset) =>
        index != DeviceModel.ConfigIndex && index < int.MaxValue && Model.StartsWork((int)index, offset);

    /// <summary>Writes a region: config space in any size, a BAR as one register access.</summary>
    internal MmioResult RegionWrite(uint index, ulong offset, ReadOnlySpan<byte> data)
    {
        if (index == DeviceModel.ConfigIndex)
        {
            CheckAccess(index, offset, (uint)data.Length, mmio: false);
            using var op = Session.Enter();
            lock (Model.Sync)
            {
                CheckOpen();
                Model.ConfigWrite((int)offset, data);
                return MmioResult.Done;
            }
        }
        CheckAccess(index, offset, (uint)data.Length, mmio: true);
        Span<byte> bytes = stackalloc byte[8];
        bytes.Clear();
        data.CopyTo(bytes);
        return MmioWrite(index, offset, (uint)data.Length, BitConverter.ToUInt64(bytes));
    }

    // ---- IDevicePort: called by the device model, under its lock ----

    DmaOutcome IDevicePort.Write(ulong iova, ReadOnlySpan<byte> data) => Write(iova, data);

    DmaOutcome IDevicePort.Read(ulong iova, Span<byte> destination) => Read(iova, destination);

    DmaOutcome IDevicePort.Write<TState>(ulong iova, int length, DmaFill<TState> fill, TState state) =>
        Report(CurrentSpace(iova, DmaAccess.Write, out var refused)?.DeviceFill(iova, length, fill, state) ?? refused, DmaAccess.Write, length);

    void IDevicePort.Interrupt(uint vector)
    {
        // Fault injection (SPEC §14): every model's interrupts pass here, so DROP/DELAY_INTERRUPT act here.
        var faults = Model.Faults;
        if (faults.Any)
        {
            if (faults.Fire(FaultKind.DropInterrupt) is not null)
                return;
            if (faults.Fire(FaultKind.DelayInterrupt) is { } delayed)
            {
                faults.Later(delayed.Settings.Delay, () => DeliverLate(vector));
                return;
            }
        }
        Deliver(vector);
    }

    private void Deliver(uint vector)
    {
        Session.Post(new InterruptEvent(Id, vector));
        Volatile.Read(ref _interruptListener)?.Invoke(vector);
    }

    // A delayed interrupt, on the clock's thread: the handle may have been closed (or the device removed) meanwhile.
    private void DeliverLate(uint vector) =>
        ((IDevicePort)this).TryRun(static (v, port) => ((DeviceHandle)port).Deliver(v), vector);

    // Called from a timer, holding no lock: the operation scope and the model's lock are taken as a
    // register access takes them, so teardown and CloseDevice wait for it in the same way.
    bool IDevicePort.TryRun<TState>(Action<TState, IDevicePort> work, TState state)
    {
        if (!Session.Gate.TryEnter())
            return false;
        try
        {
            lock (Model.Sync)
            {
                if (Closed || Gone)
                    return false;
                work(state, this);
                return true;
            }
        }
        finally
        {
            Session.Gate.Exit();
        }
    }

    bool IDevicePort.Post<TState>(Action<TState, IDevicePort> work, TState state)
    {
        if (_engines is null)
            return false;
        try
        {
            // Not awaited: the work reports what it does through the device (completions, interrupts, faults).
            _ = _engines.RunAsync(() => ((IDevicePort)this).TryRun(work, state));
            return true;
        }
        catch (ObjectDisposedException)
        {
            // The broker is being disposed: its sessions end, and with them this device's work.
            return false;
        }
    }

    private DmaOutcome Write(ulong iova, ReadOnlySpan<byte> data) =>
        Report(CurrentSpace(iova, DmaAccess.Write, out var refused)?.DeviceWrite(iova, data) ?? refused, DmaAccess.Write, data.Length);

    private DmaOutcome Read(ulong iova, Span<byte> destination) =>
        Report(CurrentSpace(iova, DmaAccess.Read, out var refused)?.DeviceRead(iova, destination) ?? refused, DmaAccess.Read, destination.Length);

    /// <summary>
    /// The address space the device's group translates through right now, for one access made under
    /// the model's lock; null, with the fault in <paramref name="refused"/>, when the device may not
    /// DMA (Bus Master off, or no user domain attached). A detach waits for the model's lock after it
    /// clears the attachment, so an access that got a space here ends before the detach returns.
    /// A session whose DMA is fenced (SPEC §16, <see cref="Session.FenceDmaAt"/>) is BLOCKED, as if
    /// detached: checked last, right before the access translates and copies.
    /// </summary>
    private IovaSpace? CurrentSpace(ulong iova, DmaAccess access, out DmaOutcome refused)
    {
        var page = iova & ~IovaSpace.PageMask;
        refused = default;
        if (!Model.BusMaster)
            refused = DmaOutcome.Faulted(page, access, FaultReason.BusMasterOff);
        // Fault injection (SPEC §14): IOMMU_FAULT refuses the access as unmapped before it translates.
        else if (Model.Faults.Any && Model.Faults.Fire(FaultKind.IommuFault) is not null)
            refused = DmaOutcome.Faulted(page, access, FaultReason.Unmapped);
        else if (Device.Group.Attached is { } domain && !Session.DmaFenced)
            return domain.Iova;
        else
            refused = DmaOutcome.Faulted(page, access, FaultReason.Blocked);
        return null;
    }

    /// <summary>Counts a device access of <paramref name="length"/> bytes that went through, or posts and counts its fault.</summary>
    private DmaOutcome Report(DmaOutcome outcome, DmaAccess access, int length)
    {
        if (outcome.Ok)
        {
            _metrics.DmaMoved(access, length);
        }
        else
        {
            _metrics.DmaFaulted(outcome.Reason);
            Session.Post(new FaultEvent(Device.Address, outcome.FaultIova, outcome.Access, outcome.Reason));
        }
        return outcome;
    }

    /// <summary>ENODEV once the device was surprise-removed, EBADF once closed; call under the model's lock.</summary>
    internal void CheckOpen()
    {
        if (Gone)
            throw ErrnoException.NoDevice(Device.Address);
        if (Closed)
            throw ErrnoException.NotFound(Errno.EBADF, $"device handle {Id} is closed");
    }

    private static ulong WidthMask(uint width) => width == 8 ? ulong.MaxValue : (1UL << (int)(8 * width)) - 1;

    private static void CheckLength(int length)
    {
        if (length is < 0 or > MaxTransfer)
            throw ErrnoException.Invalid($"a device access moves 0 to {MaxTransfer} bytes, not {length}");
    }

    private void CheckAccess(uint index, ulong offset, uint size, bool mmio)
    {
        var regionSize = Model.RegionSize(index);
        if (regionSize == 0)
            throw ErrnoException.Invalid(index is 6 or > 7
                ? $"region {index} is not supported: use 0-5 for BAR0-BAR5 or 7 for config space"
                : $"{Device.Address} has no BAR{index}");
        if (mmio && size is not (1 or 2 or 4 or 8))
            throw ErrnoException.Invalid($"a register access is 1, 2, 4 or 8 bytes wide, not {size}");
        if (size == 0 || offset >= regionSize || size > regionSize - offset)
            throw ErrnoException.Invalid($"[0x{offset:x}, +{size}) is outside region {index} (0x{regionSize:x} bytes)");
    }
}
