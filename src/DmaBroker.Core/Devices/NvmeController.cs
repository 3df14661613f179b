using System.Buffers.Binary;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Devices;

/// <summary>
/// An NVMe controller (SPEC §14): a subset of NVM Express 1.4 as QEMU's hw/nvme implements it.
/// The driver keeps its queues in its own memory; the controller fetches commands, moves data
/// through PRPs and posts completions by DMA through <see cref="IDevicePort"/>, so every access is
/// translated by the IOMMU, and signals one MSI-X vector per completion queue. Commands run when the
/// driver rings a submission queue's tail doorbell, synchronously under the model's lock (lock 4 of
/// <c>docs/locking.md</c>): in order per queue, each completed exactly once, and never more than the
/// completion queue has room for — the rest wait for the completion queue's head doorbell. Once the
/// driver configured shadow doorbells (Doorbell Buffer Config), the controller also reads the queues'
/// tails and heads from the driver's memory and keeps fetching while the driver keeps the tail moving,
/// in slices of <see cref="CommandsPerSlice"/> commands that continue on the device engines.
/// docs/nvme.md describes the registers, what is implemented and where fault injection hooks in.
/// </summary>
internal sealed partial class NvmeController : DeviceModel
{
    public const ulong Bar0Size = 16 * 1024;
    public const int PageSize = 4096;
    public const ulong PageMask = PageSize - 1;
    /// <summary>CAP.MQES: the largest I/O queue, 0-based (1024 entries).</summary>
    public const int MaxQueueEntriesMinusOne = 1023;
    /// <summary>The largest admin queue AQA can describe (12 bits, 0-based).</summary>
    public const int MaxAdminEntriesMinusOne = 4095;
    /// <summary>I/O queue pairs, as Get/Set Features (Number of Queues) report them: queue ids 1-64.</summary>
    public const int IoQueuePairs = 64;
    /// <summary>MSI-X vectors: one for the admin completion queue and one per I/O completion queue.</summary>
    public const int Vectors = IoQueuePairs + 1;
    /// <summary>Identify Controller MDTS: 2^5 pages, so a command moves at most 128 KiB.</summary>
    public const byte Mdts = 5;
    public const int MaxTransfer = PageSize << Mdts;
    public const int SqEntrySize = 64;
    public const int CqEntrySize = 16;
    public const uint NamespaceId = 1;

    public const ulong RegCap = 0x00;
    public const ulong RegVs = 0x08;
    public const ulong RegIntms = 0x0c;
    public const ulong RegIntmc = 0x10;
    public const ulong RegCc = 0x14;
    public const ulong RegCsts = 0x1c;
    public const ulong RegNssr = 0x20;
    public const ulong RegAqa = 0x24;
    public const ulong RegAsq = 0x28;
    public const ulong RegAcq = 0x30;
    public const ulong RegDoorbells = 0x1000;

    /// <summary>CAP.TO, in 500 ms units: how long a driver waits for CSTS.RDY (7.5 s, as QEMU).</summary>
    public const ulong TimeoutUnits = 0x0f;

    /// <summary>CAP: MQES 1023, CQR, TO, DSTRD 0, CSS NVM, MPSMIN = MPSMAX = 0 (4 KiB).</summary>
    public const ulong Capabilities = MaxQueueEntriesMinusOne | (1UL << 16) | (TimeoutUnits << 24) | (1UL << 37);
    public const uint Version = 0x0001_0400;

    public const uint CcEnable = 1;
    public const int CcCssShift = 4;
    public const int CcMpsShift = 7;
    public const int CcAmsShift = 11;
    public const int CcShnShift = 14;
    public const int CcIosqesShift = 16;
    public const int CcIocqesShift = 20;
    /// <summary>The CC bits that exist (EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES); the rest are reserved and read 0.</summary>
    public const uint CcWritable = 0x00ff_fff1;
    public const uint Iosqes = 6;
    public const uint Iocqes = 4;

    public const uint CstsReady = 1;
    public const uint CstsFatal = 1 << 1;
    public const uint CstsShutdownComplete = 2 << 2;
    public const uint CstsShutdownMask = 3 << 2;

    public const uint AqaWritable = 0x0fff_0fff;

    /// <summary>
    /// With shadow doorbells, how many commands of one submission queue a turn of the controller runs
    /// under the model's lock before it lets other accesses in and continues on the device engines
    /// (4 MiB of 128 KiB reads).
    /// </summary>
    public const int CommandsPerSlice = 32;

    private static readonly ulong[] Bars = [Bar0Size, 0, 0, 0, 0, 0];

    private readonly SubmissionQueue?[] _sqs = new SubmissionQueue?[IoQueuePairs + 1];
    private readonly CompletionQueue?[] _cqs = new CompletionQueue?[IoQueuePairs + 1];
    private uint _cc;
    private uint _csts;
    private uint _aqa;
    private ulong _asq;
    private ulong _acq;
    private uint _intms;
    // SLOW_RESET: CSTS.RDY is due once this much time has passed since _readySince (broker clock timestamps).
    private TimeSpan? _readyDelay;
    private long _readySince;
    // Doorbell Buffer Config (NVMe 1.3): the shadow doorbell and EventIdx pages in the driver's memory (IOVAs); 0: not configured.
    private ulong _shadowDoorbells;
    private ulong _eventIndexes;
    // A continuation of the controller's work is queued on the device engines.
    private bool _continuing;

    public NvmeController(PciFunctionSpec spec) : base(spec)
    {
        Namespace = new NvmeNamespace((ulong)spec.NamespaceMb << 20);
    }

    public override IReadOnlyList<ulong> BarSizes => Bars;

    public NvmeNamespace Namespace { get; }

    /// <summary>
    /// Doorbell writes ignored because the queue does not exist or the value is beyond its size (or
    /// the write was not one aligned dword), as hardware ignores them. Counts over the device's life.
    /// </summary>
    public ulong IgnoredDoorbells { get; private set; }

    /// <summary>Whether Doorbell Buffer Config is in effect: the queues' doorbells are read from the driver's shadow page.</summary>
    public bool ShadowDoorbells => _shadowDoorbells != 0;

    // ---- registers ----

    public override ulong MmioRead(int bar, ulong offset, int width)
    {
        // Doorbells are write-only; the area after the registers reads as zero, as QEMU's does.
        if (offset >= RegDoorbells)
            return 0;
        ulong value = 0;
        for (var i = width - 1; i >= 0; i--)
        {
            var at = offset + (ulong)i;
            value = (value << 8) | ((ReadDword(at & ~3UL) >> (int)(8 * (at & 3))) & 0xff);
        }
        return value;
    }

    /// <summary>A submission queue's tail doorbell runs the commands posted to it, transfers and all.</summary>
    public override bool StartsWork(int bar, ulong offset) => bar == 0 && offset >= RegDoorbells;

    public override MmioResult MmioWrite(int bar, ulong offset, int width, ulong value, IDevicePort port)
    {
        if (offset >= RegDoorbells)
        {
            RingDoorbell(offset, width, value, port);
            return MmioResult.Done;
        }
        // The spec asks for aligned dword (or qword) register writes; others are ignored, as QEMU should.
        if ((offset & 3) != 0 || width < 4)
            return MmioResult.Done;
        WriteDword(offset, (uint)value, port);
        if (width == 8)
            WriteDword(offset + 4, (uint)(value >> 32), port);
        return MmioResult.Done;
    }

    protected override void ResetRegisters()
    {
        _cc = _aqa = _intms = 0;
        _asq = _acq = 0;
        ResetController();
    }

    private uint ReadDword(ulong offset) => offset switch
    {
        RegCap => unchecked((uint)Capabilities),
        RegCap + 4 => (uint)(Capabilities >> 32),
        RegVs => Version,
        RegIntms or RegIntmc => _intms,
        RegCc => _cc,
        RegCsts => CatchUpReady(),
        RegAqa => _aqa,
        RegAsq => (uint)_asq,
        RegAsq + 4 => (uint)(_asq >> 32),
        RegAcq => (uint)_acq,
        RegAcq + 4 => (uint)(_acq >> 32),
        _ => 0,
    };

    private void WriteDword(ulong offset, uint value, IDevicePort port)
    {
        switch (offset)
        {
            case RegIntms:
                _intms |= value;
                break;
            case RegIntmc:
                var unmasked = _intms & value;
                _intms &= ~value;
                SignalUnmasked(unmasked, port);
                break;
            case RegCc:
                WriteCc(value & CcWritable);
                break;
            case RegAqa:
                _aqa = value & AqaWritable;
                break;
            case RegAsq or RegAsq + 4:
                _asq = WithDword(_asq, offset - RegAsq, value);
                break;
            case RegAcq or RegAcq + 4:
                _acq = WithDword(_acq, offset - RegAcq, value);
                break;
            // CAP, VS and CSTS are read-only; NSSR is not supported (CAP.NSSRS = 0): writes have no effect.
        }
    }

    /// <summary>A 64-bit register with its low (<paramref name="at"/> 0) or high (4) dword replaced.</summary>
    private static ulong WithDword(ulong register, ulong at, uint value) =>
        at == 0 ? (register & 0xffff_ffff_0000_0000) | value : (register & 0xffff_ffff) | ((ulong)value << 32);

    private void WriteCc(uint value)
    {
        var old = _cc;
        _cc = value;
        var enable = (value & CcEnable) != 0;
        var wasEnabled = (old & CcEnable) != 0;
        if (enable && !wasEnabled)
        {
            if (StartIsValid())
            {
                _cqs[0] = new CompletionQueue(0, _acq, (int)(_aqa >> 16) + 1, interrupts: true, vector: 0);
                _sqs[0] = new SubmissionQueue(0, _asq, (int)(_aqa & 0xfff) + 1, _cqs[0]!);
                SetReady();
            }
            else
            {
                _csts |= CstsFatal;
            }
        }
        else if (!enable && wasEnabled)
        {
            ResetController();
        }
        var shutdown = (value >> CcShnShift) & 3;
        var wasShutdown = (old >> CcShnShift) & 3;
        // As QEMU: a shutdown notification completes at once (there is nothing to flush); the queues stay.
        if (shutdown != 0 && wasShutdown == 0)
            _csts = (_csts & ~CstsShutdownMask) | CstsShutdownComplete;
        else if (shutdown == 0 && wasShutdown != 0)
            _csts &= ~CstsShutdownMask;
    }

    /// <summary>
    /// CC and the admin queue registers at the moment EN rises: the NVM command set, 4 KiB pages,
    /// round-robin arbitration, queue entry sizes 64/16 (or 0, not yet set: checked when an I/O queue
    /// is created), admin queues of at least two entries at page-aligned addresses.
    /// </summary>
    private bool StartIsValid()
    {
        var css = (_cc >> CcCssShift) & 7;
        var mps = (_cc >> CcMpsShift) & 0xf;
        var ams = (_cc >> CcAmsShift) & 7;
        var iosqes = (_cc >> CcIosqesShift) & 0xf;
        var iocqes = (_cc >> CcIocqesShift) & 0xf;
        return css == 0 && mps == 0 && ams == 0
            && iosqes is 0 or Iosqes && iocqes is 0 or Iocqes
            && (_aqa & 0xfff) != 0 && (_aqa >> 16) != 0
            && (_asq & PageMask) == 0 && (_acq & PageMask) == 0;
    }

    /// <summary>CSTS.RDY rises: the one place a delayed ready (SLOW_RESET) hooks in.</summary>
    private void SetReady()
    {
        if (Faults.Any && Faults.Fire(FaultKind.SlowReset) is { } slow)
        {
            _readyDelay = slow.Settings.Delay;
            _readySince = Faults.Time.GetTimestamp();
            return;
        }
        _csts |= CstsReady;
    }

    /// <summary>CSTS as it reads now: a late RDY (SLOW_RESET) rises once its delay has passed on the broker's clock.</summary>
    private uint CatchUpReady()
    {
        if (_readyDelay is { } delay && Faults.Time.GetElapsedTime(_readySince) >= delay)
        {
            _readyDelay = null;
            _csts |= CstsReady;
        }
        return _csts;
    }

    /// <summary>Controller reset (CC.EN 1 → 0, or FLR): every queue dropped, with whatever was not yet fetched; RDY and CFS clear.</summary>
    private void ResetController()
    {
        Array.Clear(_sqs);
        Array.Clear(_cqs);
        _csts = 0;
        _readyDelay = null;
        // As QEMU's nvme_ctrl_reset: the driver configures shadow doorbells again after a reset.
        _shadowDoorbells = _eventIndexes = 0;
        _continuing = false;
    }

    private bool Ready => (CatchUpReady() & (CstsReady | CstsFatal)) == CstsReady;

    /// <summary>
    /// CSTS.CFS: a fatal error the controller could not report in a completion queue (fetching a
    /// command or posting a completion faulted). It stops processing until the driver resets it.
    /// </summary>
    private void Fail() => _csts |= CstsFatal;

    // ---- doorbells and queues ----

    private void RingDoorbell(ulong offset, int width, ulong value, IDevicePort port)
    {
        // A dead (CFS) or disabled controller has no queues that a doorbell could name.
        if ((offset & 3) != 0 || width != 4)
        {
            IgnoredDoorbells++;
            return;
        }
        var index = (offset - RegDoorbells) / 4;
        var qid = index / 2;
        if ((index & 1) == 0)
        {
            var sq = qid < (ulong)_sqs.Length && Ready ? _sqs[qid] : null;
            if (sq is null || value >= (ulong)sq.Size)
            {
                IgnoredDoorbells++;
                return;
            }
            sq.Tail = (int)value;
            // As QEMU: the admin queue's MMIO doorbell stays authoritative with shadow doorbells (drivers
            // do not all update its shadow), so it is copied there; an I/O queue's shadow overrides it.
            if (sq.Id == 0 && ShadowDoorbells && !WriteShadow(_shadowDoorbells, SqSlot(0), (uint)value, port))
                return;
            Process(sq, port);
        }
        else
        {
            var cq = qid < (ulong)_cqs.Length && Ready ? _cqs[qid] : null;
            if (cq is null || value >= (ulong)cq.Size)
            {
                IgnoredDoorbells++;
                return;
            }
            // With shadow doorbells an I/O completion queue's MMIO head is only a wake-up, as QEMU reads the
            // shadow head before every post: the driver writes the shadow first, so it is never older, while
            // an MMIO doorbell sent without waiting can land after a newer shadow head (the head would go back).
            if (cq.Id != 0 && ShadowDoorbells)
            {
                if (ReadShadowIndex(CqSlot(cq.Id), cq.Size, cq.Head, port) is not { } shadowHead)
                    return;
                value = (ulong)shadowHead;
            }
            cq.Head = (int)value;
            if (cq.Id == 0 && ShadowDoorbells && !WriteShadow(_shadowDoorbells, CqSlot(0), (uint)value, port))
                return;
            // Submission queues stop when their completion queue is full; room again lets them go on.
            foreach (var sq in _sqs)
            {
                if (sq?.Cq == cq)
                    Process(sq, port);
            }
        }
        SignalPosted(port);
    }

    /// <summary>
    /// Fetches and runs the queue's commands while there are any, the controller is alive and the
    /// completion queue has room. With shadow doorbells the tail is read from the driver's shadow page
    /// before every command, so commands the driver adds meanwhile run without an MMIO doorbell; before
    /// it stops, the controller publishes the tail it saw as the queue's EventIdx and reads the shadow
    /// once more (the driver rings the MMIO doorbell only for a tail moved past EventIdx). After
    /// <see cref="CommandsPerSlice"/> commands the rest continues on the device engines.
    /// </summary>
    private void Process(SubmissionQueue sq, IDevicePort port)
    {
        Span<byte> entry = stackalloc byte[SqEntrySize];
        var slice = CommandsPerSlice;
        while (Ready && _sqs[sq.Id] == sq)
        {
            if (ShadowDoorbells && !ReadShadowTail(sq, port))
                return;
            if (sq.Head == sq.Tail && !(ShadowDoorbells && GoIdle(sq, port)))
                return;
            if (CompletionQueueFull(sq.Cq, port))
                return;
            if (ShadowDoorbells && slice-- == 0 && ContinueLater(port))
                return;
            if (!port.Read(sq.Base + (ulong)(sq.Head * SqEntrySize), entry).Ok)
            {
                Fail();
                return;
            }
            sq.Head = (sq.Head + 1) % sq.Size;
            var command = new NvmeCommand(entry);
            var (status, result) = InjectedError(sq, command) is { } injected ? (injected, 0u)
                : sq.Id == 0 ? ExecuteAdmin(command, port) : ExecuteIo(command, port);
            Complete(sq, command.Cid, status, result, port);
        }
    }

    /// <summary>
    /// DEVICE_ERROR (SPEC §14): the status an injected fault completes this command with instead of
    /// running it, or null. Decoded before it runs, so nothing moves.
    /// </summary>
    private NvmeStatus? InjectedError(SubmissionQueue sq, in NvmeCommand c)
    {
        if (!Faults.Any)
            return null;
        var readWrite = sq.Id != 0 && c.Opcode is IoRead or IoWrite;
        var command = new CommandEvent(sq.Id != 0, c.Opcode,
            readWrite ? c.Cdw10 | ((ulong)c.Cdw11 << 32) : null, readWrite ? (c.Cdw12 & 0xffff) + 1UL : 0);
        // The injector wrote the default status (Data Transfer Error) into the settings.
        return Faults.Fire(FaultKind.DeviceError, command) is { } fault ? (NvmeStatus)fault.Settings.Status : null;
    }

    /// <summary>Writes a completion queue entry (with the current phase) and advances the tail, flipping the phase on wrap.</summary>
    private void Complete(SubmissionQueue sq, ushort cid, NvmeStatus status, uint result, IDevicePort port)
    {
        var cq = sq.Cq;
        Span<byte> entry = stackalloc byte[CqEntrySize];
        BinaryPrimitives.WriteUInt32LittleEndian(entry, result);
        BinaryPrimitives.WriteUInt32LittleEndian(entry[4..], 0);
        BinaryPrimitives.WriteUInt32LittleEndian(entry[8..], (uint)sq.Head | ((uint)sq.Id << 16));
        BinaryPrimitives.WriteUInt32LittleEndian(entry[12..], cid | (cq.Phase ? 1u << 16 : 0) | ((uint)status << 17));
        var at = cq.Tail;
        if (!port.Write(cq.Base + (ulong)(at * CqEntrySize), entry).Ok)
        {
            Fail();
            return;
        }
        if (++cq.Tail == cq.Size)
        {
            cq.Tail = 0;
            cq.Phase = !cq.Phase;
        }
        cq.Posted = true;
        if (ShadowDoorbells)
            SignalCaughtUp(cq, at, port);
    }

    /// <summary>
    /// With shadow doorbells a turn of the controller can be long, and a driver that consumed every
    /// completion may have gone to wait for the interrupt: the first entry posted into a queue whose
    /// shadow head shows it consumed (after a full barrier, as the driver has one between its head and
    /// the phase tag it then reads) signals at once, once per turn; the turn's end signals as always.
    /// </summary>
    private void SignalCaughtUp(CompletionQueue cq, int posted, IDevicePort port)
    {
        if (cq.SignaledEarly || !cq.Interrupts || Masked(cq.Vector))
            return;
        Interlocked.MemoryBarrier();
        if (ReadShadowIndex(CqSlot(cq.Id), cq.Size, cq.Head, port) is not { } head)
            return;
        cq.Head = head;
        if (cq.Head != posted)
            return;
        cq.SignaledEarly = true;
        Signal(cq, port);
    }

    /// <summary>One interrupt per completion queue that got entries in this doorbell's work, in queue order.</summary>
    private void SignalPosted(IDevicePort port)
    {
        foreach (var cq in _cqs)
        {
            if (cq is not { Posted: true })
                continue;
            cq.Posted = false;
            cq.SignaledEarly = false;
            if (cq.Interrupts && !Masked(cq.Vector))
                Signal(cq, port);
        }
    }

    /// <summary>INTMC unmasked these vectors: a queue on one of them that holds unconsumed entries signals now.</summary>
    private void SignalUnmasked(uint vectors, IDevicePort port)
    {
        foreach (var cq in _cqs)
        {
            if (cq is { Interrupts: true } && cq.Vector < 32 && (vectors & (1u << cq.Vector)) != 0 && cq.Head != cq.Tail)
                Signal(cq, port);
        }
    }

    private bool Masked(ushort vector) => vector < 32 && (_intms & (1u << vector)) != 0;

    /// <summary>The one place the controller raises an MSI-X vector; DROP/DELAY_INTERRUPT act on it in the port (DeviceHandle), as for every model.</summary>
    private static void Signal(CompletionQueue cq, IDevicePort port) => port.Interrupt(cq.Vector);

    // ---- shadow doorbells (Doorbell Buffer Config) ----

    /// <summary>A submission queue's dword in the shadow doorbell and EventIdx pages (CAP.DSTRD 0: as its doorbell's offset).</summary>
    private static ulong SqSlot(int qid) => 8UL * (ulong)qid;

    private static ulong CqSlot(int qid) => (8UL * (ulong)qid) + 4;

    /// <summary>Takes the driver's shadow tail as the queue's tail (<see cref="ReadShadowIndex"/>); false once the controller failed.</summary>
    private bool ReadShadowTail(SubmissionQueue sq, IDevicePort port)
    {
        if (ReadShadowIndex(SqSlot(sq.Id), sq.Size, sq.Tail, port) is not { } tail)
            return false;
        sq.Tail = tail;
        // While it has commands to fetch the controller needs no doorbell: EventIdx sits just behind the tail it saw.
        return sq.Head == sq.Tail || PublishEventIndex(SqSlot(sq.Id), ref sq.EventIndex, (sq.Tail + sq.Size - 1) % sq.Size, port);
    }

    /// <summary>
    /// The queue looks empty: EventIdx = the tail, so that the driver rings the doorbell for the next
    /// command, then the shadow tail once more, for one written before the driver could see that
    /// EventIdx (a full barrier between, as the driver has one between its tail and its EventIdx read).
    /// True when there are commands after all.
    /// </summary>
    private bool GoIdle(SubmissionQueue sq, IDevicePort port)
    {
        if (!PublishEventIndex(SqSlot(sq.Id), ref sq.EventIndex, sq.Tail, port))
            return false;
        Interlocked.MemoryBarrier();
        return ReadShadowTail(sq, port) && sq.Head != sq.Tail;
    }

    /// <summary>
    /// Whether the completion queue has no free slot. With shadow doorbells a full queue is looked at
    /// again in the shadow page, after EventIdx = its head (so the driver rings the head doorbell when
    /// it frees a slot), the way <see cref="GoIdle"/> does for a submission queue.
    /// </summary>
    private bool CompletionQueueFull(CompletionQueue cq, IDevicePort port)
    {
        if (!cq.Full || !ShadowDoorbells)
            return cq.Full;
        if (!PublishEventIndex(CqSlot(cq.Id), ref cq.EventIndex, cq.Head, port))
            return true;
        Interlocked.MemoryBarrier();
        if (ReadShadowIndex(CqSlot(cq.Id), cq.Size, cq.Head, port) is not { } head)
            return true;
        cq.Head = head;
        if (cq.Full)
            return true;
        // Room again, and the controller is working: no head doorbell needed until it fills up again.
        return !PublishEventIndex(CqSlot(cq.Id), ref cq.EventIndex, (cq.Head + cq.Size - 1) % cq.Size, port);
    }

    /// <summary>Writes a queue's EventIdx unless it already holds <paramref name="value"/>; false (CFS) when the IOMMU refuses the page.</summary>
    private bool PublishEventIndex(ulong slot, ref int published, int value, IDevicePort port)
    {
        if (published == value)
            return true;
        if (!WriteShadow(_eventIndexes, slot, (uint)value, port))
            return false;
        published = value;
        return true;
    }

    /// <summary>
    /// The tail or head the driver wrote in its shadow doorbell at <paramref name="slot"/>; one beyond
    /// the queue's <paramref name="size"/> is ignored and counted, as such an MMIO doorbell is
    /// (<paramref name="current"/> stays). Null when the IOMMU refuses the page: fatal (CFS), as a
    /// command fetch that faults, and the fault is posted.
    /// </summary>
    private int? ReadShadowIndex(ulong slot, int size, int current, IDevicePort port)
    {
        Span<byte> bytes = stackalloc byte[sizeof(uint)];
        if (!port.Read(_shadowDoorbells + slot, bytes).Ok)
        {
            Fail();
            return null;
        }
        var value = BinaryPrimitives.ReadUInt32LittleEndian(bytes);
        if (value < (uint)size)
            return (int)value;
        IgnoredDoorbells++;
        return current;
    }

    /// <summary>A shadow doorbell or EventIdx the controller writes; false (CFS) when the IOMMU refuses the page.</summary>
    private bool WriteShadow(ulong page, ulong slot, uint value, IDevicePort port)
    {
        if (TryWriteDword(page + slot, value, port))
            return true;
        Fail();
        return false;
    }

    private static bool TryWriteDword(ulong iova, uint value, IDevicePort port)
    {
        Span<byte> bytes = stackalloc byte[sizeof(uint)];
        BinaryPrimitives.WriteUInt32LittleEndian(bytes, value);
        return port.Write(iova, bytes).Ok;
    }

    /// <summary>
    /// Ends this turn of the controller's work and queues the next on the device engines, so that a
    /// driver that keeps its queue full does not hold the model's lock (and a detach, a reset or a
    /// register read) for as long as it goes on. False where there are no engines: then the caller goes on.
    /// </summary>
    private bool ContinueLater(IDevicePort port)
    {
        if (_continuing)
            return true;
        if (!port.Post(static (controller, p) => controller.Continue(p), this))
            return false;
        _continuing = true;
        return true;
    }

    /// <summary>The next turn: every submission queue, as a doorbell would run it, then its interrupts.</summary>
    private void Continue(IDevicePort port)
    {
        if (!_continuing)
            return;
        _continuing = false;
        foreach (var sq in _sqs)
        {
            if (sq is not null)
                Process(sq, port);
        }
        SignalPosted(port);
    }

    private sealed class SubmissionQueue(ushort id, ulong @base, int size, CompletionQueue cq)
    {
        public ushort Id { get; } = id;
        public ulong Base { get; } = @base;
        public int Size { get; } = size;
        public CompletionQueue Cq { get; } = cq;
        public int Head { get; set; }
        public int Tail { get; set; }
        /// <summary>The EventIdx last written for this queue (shadow doorbells); -1: none yet.</summary>
        public int EventIndex = -1;
    }

    private sealed class CompletionQueue(ushort id, ulong @base, int size, bool interrupts, ushort vector)
    {
        public ushort Id { get; } = id;
        public ulong Base { get; } = @base;
        public int Size { get; } = size;
        public bool Interrupts { get; } = interrupts;
        public ushort Vector { get; } = vector;
        public int Head { get; set; }
        public int Tail { get; set; }
        /// <summary>The phase tag the next entry carries: 1 on the first pass, flipped on every wrap.</summary>
        public bool Phase { get; set; } = true;
        /// <summary>Entries were posted since the last interrupt decision.</summary>
        public bool Posted { get; set; }
        /// <summary>This turn already signalled a driver that had caught up (shadow doorbells).</summary>
        public bool SignaledEarly { get; set; }
        /// <summary>The EventIdx last written for this queue (shadow doorbells); -1: none yet.</summary>
        public int EventIndex = -1;
        public bool Full => (Tail + 1) % Size == Head;
    }
}
