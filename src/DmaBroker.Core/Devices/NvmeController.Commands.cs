using System.Buffers;
using System.Buffers.Binary;
using System.Text;
using DmaBroker.Core.Iommu;

namespace DmaBroker.Core.Devices;

/// <summary>
/// A completion's 15-bit status field (NVMe 1.4 figure 126): status code, status code type (bits
/// 10:8; 1 = command specific) and Do Not Retry (bit 14), which is set where retrying cannot help.
/// </summary>
internal enum NvmeStatus : ushort
{
    Success = 0x000,
    InvalidOpcode = Dnr | 0x001,
    InvalidField = Dnr | 0x002,
    /// <summary>A PRP (or PRP list) the IOMMU refused: retrying after the driver maps it may succeed, so no DNR.</summary>
    DataTransferError = 0x004,
    InvalidNamespace = Dnr | 0x00b,
    InvalidPrpOffset = Dnr | 0x013,
    LbaOutOfRange = Dnr | 0x080,
    CompletionQueueInvalid = Dnr | 0x100,
    InvalidQueueIdentifier = Dnr | 0x101,
    InvalidQueueSize = Dnr | 0x102,
    InvalidInterruptVector = Dnr | 0x108,
    InvalidQueueDeletion = Dnr | 0x10c,
    FeatureNotSaveable = Dnr | 0x10d,
    Dnr = 0x4000,
}

/// <summary>The fields of a 64-byte submission queue entry the controller uses (NVMe 1.4 figure 105).</summary>
internal readonly struct NvmeCommand
{
    public NvmeCommand(ReadOnlySpan<byte> entry)
    {
        var dw0 = BinaryPrimitives.ReadUInt32LittleEndian(entry);
        Opcode = (byte)dw0;
        Fuse = (byte)((dw0 >> 8) & 3);
        Psdt = (byte)((dw0 >> 14) & 3);
        Cid = (ushort)(dw0 >> 16);
        Nsid = BinaryPrimitives.ReadUInt32LittleEndian(entry[4..]);
        Prp1 = BinaryPrimitives.ReadUInt64LittleEndian(entry[24..]);
        Prp2 = BinaryPrimitives.ReadUInt64LittleEndian(entry[32..]);
        Cdw10 = BinaryPrimitives.ReadUInt32LittleEndian(entry[40..]);
        Cdw11 = BinaryPrimitives.ReadUInt32LittleEndian(entry[44..]);
        Cdw12 = BinaryPrimitives.ReadUInt32LittleEndian(entry[48..]);
    }

    public byte Opcode { get; }
    public byte Fuse { get; }
    public byte Psdt { get; }
    public ushort Cid { get; }
    public uint Nsid { get; }
    public ulong Prp1 { get; }
    public ulong Prp2 { get; }
    public uint Cdw10 { get; }
    public uint Cdw11 { get; }
    public uint Cdw12 { get; }
}

internal sealed partial class NvmeController
{
    public const byte AdminDeleteSq = 0x00;
    public const byte AdminCreateSq = 0x01;
    public const byte AdminDeleteCq = 0x04;
    public const byte AdminCreateCq = 0x05;
    public const byte AdminIdentify = 0x06;
    public const byte AdminAbort = 0x08;
    public const byte AdminSetFeatures = 0x09;
    public const byte AdminGetFeatures = 0x0a;
    /// <summary>Doorbell Buffer Config (NVMe 1.3): PRP1 the shadow doorbell page, PRP2 the EventIdx page.</summary>
    public const byte AdminDoorbellBufferConfig = 0x7c;
    /// <summary>Identify Controller OACS bit 8: Doorbell Buffer Config is supported.</summary>
    public const ushort OacsDoorbellBufferConfig = 1 << 8;
    public const byte IoFlush = 0x00;
    public const byte IoWrite = 0x01;
    public const byte IoRead = 0x02;
    public const byte FeatureNumberOfQueues = 0x07;
    public const byte CnsNamespace = 0;
    public const byte CnsController = 1;
    public const byte CnsActiveNamespaces = 2;
    public const int IdentifySize = 4096;

    /// <summary>Number of Queues as Get/Set Features report it: NSQA and NCQA, 0-based.</summary>
    public const uint QueuesAllocated = (IoQueuePairs - 1) | ((IoQueuePairs - 1) << 16);

    /// <summary>PRP entries a command can need: every page of the largest transfer, plus one when PRP1 starts mid-page.</summary>
    private const int MaxPrpSegments = (MaxTransfer / PageSize) + 1;

    private (NvmeStatus Status, uint Result) ExecuteAdmin(in NvmeCommand c, IDevicePort port)
    {
        // Fused operations and SGLs (CAP and Identify advertise neither) are refused as QEMU does.
        if (c.Fuse != 0 || c.Psdt != 0)
            return (NvmeStatus.InvalidField, 0);
        return c.Opcode switch
        {
            AdminDeleteSq => (DeleteSq(c), 0),
            AdminCreateSq => (CreateSq(c, port), 0),
            AdminDeleteCq => (DeleteCq(c), 0),
            AdminCreateCq => (CreateCq(c, port), 0),
            AdminIdentify => (Identify(c, port), 0),
            // Commands run to completion before the next is fetched: there is never one to abort (DW0 bit 0: not aborted).
            AdminAbort => (NvmeStatus.Success, 1),
            AdminSetFeatures => SetFeatures(c),
            AdminGetFeatures => GetFeatures(c),
            AdminDoorbellBufferConfig => (DoorbellBufferConfig(c, port), 0),
            _ => (NvmeStatus.InvalidOpcode, 0),
        };
    }

    private (NvmeStatus Status, uint Result) ExecuteIo(in NvmeCommand c, IDevicePort port)
    {
        if (c.Fuse != 0 || c.Psdt != 0)
            return (NvmeStatus.InvalidField, 0);
        return c.Opcode switch
        {
            // A flush may name every namespace (NSID FFFFFFFFh); there is no volatile cache to write back.
            IoFlush => (c.Nsid is NamespaceId or uint.MaxValue ? NvmeStatus.Success : NvmeStatus.InvalidNamespace, 0),
            IoWrite or IoRead => (ReadWrite(c, port), 0),
            _ => (NvmeStatus.InvalidOpcode, 0),
        };
    }

    private NvmeStatus CreateCq(in NvmeCommand c, IDevicePort port)
    {
        var (qid, size) = ((ushort)c.Cdw10, (int)(c.Cdw10 >> 16) + 1);
        var vector = (ushort)(c.Cdw11 >> 16);
        var status = CheckNewQueue(c, qid <= IoQueuePairs && _cqs[qid] is not null, Iocqes, CcIocqesShift);
        if (status != NvmeStatus.Success)
            return status;
        if (vector >= Vectors)
            return NvmeStatus.InvalidInterruptVector;
        var cq = new CompletionQueue(qid, c.Prp1, size, interrupts: (c.Cdw11 & 2) != 0, vector);
        _cqs[qid] = cq;
        // A new queue's shadow head and EventIdx are 0, whatever an earlier queue of that id left there
        // (a stale head would make it look full): the driver rings for its first head.
        if (ShadowDoorbells)
            _ = WriteShadow(_shadowDoorbells, CqSlot(qid), 0, port) && PublishEventIndex(CqSlot(qid), ref cq.EventIndex, 0, port);
        return NvmeStatus.Success;
    }

    /// <summary>
    /// What Create I/O SQ and CQ check alike (CDW10 QID and QSIZE, PRP1, CDW11 PC): the id is free and
    /// 1-64, 2 to MQES + 1 entries, the base page aligned, physically contiguous (CAP.CQR), and CC
    /// announced the entry size this queue uses.
    /// </summary>
    private NvmeStatus CheckNewQueue(in NvmeCommand c, bool exists, uint entrySize, int ccShift)
    {
        var qid = (ushort)c.Cdw10;
        var sizeMinusOne = c.Cdw10 >> 16;
        if (qid is 0 or > IoQueuePairs || exists)
            return NvmeStatus.InvalidQueueIdentifier;
        if (sizeMinusOne is 0 or > MaxQueueEntriesMinusOne)
            return NvmeStatus.InvalidQueueSize;
        if ((c.Prp1 & PageMask) != 0)
            return NvmeStatus.InvalidPrpOffset;
        if ((c.Cdw11 & 1) == 0 || ((_cc >> ccShift) & 0xf) != entrySize)
            return NvmeStatus.InvalidField;
        return NvmeStatus.Success;
    }

    private NvmeStatus CreateSq(in NvmeCommand c, IDevicePort port)
    {
        var (qid, size) = ((ushort)c.Cdw10, (int)(c.Cdw10 >> 16) + 1);
        var cqid = (ushort)(c.Cdw11 >> 16);
        if (cqid is 0 or > IoQueuePairs || _cqs[cqid] is not { } cq)
            return NvmeStatus.CompletionQueueInvalid;
        var status = CheckNewQueue(c, qid <= IoQueuePairs && _sqs[qid] is not null, Iosqes, CcIosqesShift);
        if (status != NvmeStatus.Success)
            return status;
        var sq = new SubmissionQueue(qid, c.Prp1, size, cq);
        _sqs[qid] = sq;
        // Idle at tail 0, whatever an earlier queue of that id left in the shadow slot (a stale tail would
        // have its old commands fetched again before the driver rings): the driver rings for its first command.
        if (ShadowDoorbells)
            _ = WriteShadow(_shadowDoorbells, SqSlot(qid), 0, port) && PublishEventIndex(SqSlot(qid), ref sq.EventIndex, 0, port);
        return NvmeStatus.Success;
    }

    /// <summary>Deletes an I/O submission queue; commands it held that were not yet fetched go with it.</summary>
    private NvmeStatus DeleteSq(in NvmeCommand c)
    {
        var qid = (ushort)c.Cdw10;
        if (qid is 0 or > IoQueuePairs || _sqs[qid] is null)
            return NvmeStatus.InvalidQueueIdentifier;
        _sqs[qid] = null;
        return NvmeStatus.Success;
    }

    private NvmeStatus DeleteCq(in NvmeCommand c)
    {
        var qid = (ushort)c.Cdw10;
        if (qid is 0 or > IoQueuePairs || _cqs[qid] is not { } cq)
            return NvmeStatus.InvalidQueueIdentifier;
        foreach (var sq in _sqs)
        {
            if (sq?.Cq == cq)
                return NvmeStatus.InvalidQueueDeletion;
        }
        _cqs[qid] = null;
        return NvmeStatus.Success;
    }

    /// <summary>
    /// Doorbell Buffer Config, as QEMU's <c>nvme_dbbuf_config</c>: PRP1 and PRP2 name the shadow
    /// doorbell and EventIdx pages (page aligned, not 0: Invalid Field otherwise). The queues that
    /// exist get their doorbell value copied into the shadow page and, idle, the same as EventIdx; a
    /// page the IOMMU refuses fails the command with Data Transfer Error (the fault posted) and leaves
    /// the configuration as it was. A controller reset drops it.
    /// </summary>
    private NvmeStatus DoorbellBufferConfig(in NvmeCommand c, IDevicePort port)
    {
        if (c.Prp1 == 0 || c.Prp2 == 0 || (c.Prp1 & PageMask) != 0 || (c.Prp2 & PageMask) != 0)
            return NvmeStatus.InvalidField;
        for (var qid = 0; qid <= IoQueuePairs; qid++)
        {
            if (_sqs[qid] is { } sq && !(TryWriteDword(c.Prp1 + SqSlot(qid), (uint)sq.Tail, port) && TryWriteDword(c.Prp2 + SqSlot(qid), (uint)sq.Tail, port)))
                return NvmeStatus.DataTransferError;
            if (_cqs[qid] is { } cq && !(TryWriteDword(c.Prp1 + CqSlot(qid), (uint)cq.Head, port) && TryWriteDword(c.Prp2 + CqSlot(qid), (uint)cq.Head, port)))
                return NvmeStatus.DataTransferError;
        }
        _shadowDoorbells = c.Prp1;
        _eventIndexes = c.Prp2;
        for (var qid = 0; qid <= IoQueuePairs; qid++)
        {
            if (_sqs[qid] is { } sq)
                sq.EventIndex = sq.Tail;
            if (_cqs[qid] is { } cq)
                cq.EventIndex = cq.Head;
        }
        return NvmeStatus.Success;
    }

    private static (NvmeStatus Status, uint Result) GetFeatures(in NvmeCommand c)
    {
        var select = (c.Cdw10 >> 8) & 7;
        if ((byte)c.Cdw10 != FeatureNumberOfQueues || select > 3)
            return (NvmeStatus.InvalidField, 0);
        // SEL 3 asks for the feature's capabilities: changeable, not saveable, not per namespace.
        return (NvmeStatus.Success, select == 3 ? 0b100u : QueuesAllocated);
    }

    private static (NvmeStatus Status, uint Result) SetFeatures(in NvmeCommand c)
    {
        if ((byte)c.Cdw10 != FeatureNumberOfQueues)
            return (NvmeStatus.InvalidField, 0);
        if ((c.Cdw10 & 0x8000_0000) != 0)
            return (NvmeStatus.FeatureNotSaveable, 0);
        if ((ushort)c.Cdw11 == 0xffff || (c.Cdw11 >> 16) == 0xffff)
            return (NvmeStatus.InvalidField, 0);
        // As QEMU: whatever was asked for, every queue pair the controller has is allocated.
        return (NvmeStatus.Success, QueuesAllocated);
    }

    private NvmeStatus Identify(in NvmeCommand c, IDevicePort port)
    {
        var cns = (byte)c.Cdw10;
        var valid = cns switch
        {
            CnsNamespace => c.Nsid == NamespaceId ? NvmeStatus.Success : NvmeStatus.InvalidNamespace,
            CnsController => NvmeStatus.Success,
            CnsActiveNamespaces => c.Nsid < 0xffff_fffe ? NvmeStatus.Success : NvmeStatus.InvalidNamespace,
            _ => NvmeStatus.InvalidField,
        };
        if (valid != NvmeStatus.Success)
            return valid;
        var buffer = ArrayPool<byte>.Shared.Rent(IdentifySize);
        try
        {
            var data = buffer.AsSpan(0, IdentifySize);
            data.Clear();
            switch (cns)
            {
                case CnsNamespace:
                    IdentifyNamespace(data);
                    break;
                case CnsController:
                    IdentifyController(data);
                    break;
                default:
                    if (c.Nsid < NamespaceId)
                        BinaryPrimitives.WriteUInt32LittleEndian(data, NamespaceId);
                    break;
            }
            return Transfer(c, IdentifySize, port, new FromBuffer(buffer));
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private void IdentifyController(Span<byte> d)
    {
        BinaryPrimitives.WriteUInt16LittleEndian(d, Spec.VendorId);
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], Spec.VendorId);
        Ascii(d.Slice(4, 20), $"DMABROKER{Spec.Address.Bus:x2}{Spec.Address.Device:x2}{Spec.Address.Function:x1}");
        Ascii(d.Slice(24, 40), "DmaBroker simulated NVMe controller");
        Ascii(d.Slice(64, 8), "1.0");
        d[72] = 6; // RAB, as QEMU
        d[77] = Mdts;
        BinaryPrimitives.WriteUInt32LittleEndian(d[80..], Version);
        d[111] = 1; // CNTRLTYPE: I/O controller
        BinaryPrimitives.WriteUInt16LittleEndian(d[256..], OacsDoorbellBufferConfig); // OACS
        d[512] = (byte)(Iosqes | (Iosqes << 4)); // SQES: required and maximum 2^6
        d[513] = (byte)(Iocqes | (Iocqes << 4)); // CQES: 2^4
        BinaryPrimitives.WriteUInt32LittleEndian(d[516..], NamespaceId); // NN
        Ascii(d.Slice(768, 256), $"nqn.2024-01.io.dmabroker:nvme:{Spec.Address}");
    }

    private void IdentifyNamespace(Span<byte> d)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(d, Namespace.Blocks);        // NSZE
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], Namespace.Blocks);   // NCAP
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], Namespace.Blocks);  // NUSE
        d[130] = 9; // LBAF0.LBADS: 2^9 = 512-byte blocks; NLBAF = 0, FLBAS = 0
    }

    /// <summary>Identify strings are ASCII, padded with spaces.</summary>
    private static void Ascii(Span<byte> field, string text)
    {
        field.Fill((byte)' ');
        Encoding.ASCII.GetBytes(text.AsSpan(0, Math.Min(text.Length, field.Length)), field);
    }

    private NvmeStatus ReadWrite(in NvmeCommand c, IDevicePort port)
    {
        if (c.Nsid != NamespaceId)
            return NvmeStatus.InvalidNamespace;
        var start = c.Cdw10 | ((ulong)c.Cdw11 << 32);
        var blocks = (c.Cdw12 & 0xffff) + 1;
        var length = (int)blocks * NvmeNamespace.BlockSize;
        if (length > MaxTransfer)
            return NvmeStatus.InvalidField;
        if (start >= Namespace.Blocks || blocks > Namespace.Blocks - start)
            return NvmeStatus.LbaOutOfRange;
        var offset = start * NvmeNamespace.BlockSize;
        // A read moves the media straight into the host's pages: one copy, as the device's DMA engine would.
        if (c.Opcode == IoRead)
            return Transfer(c, length, port, new FromMedia(Namespace, offset));
        var buffer = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            var data = buffer.AsSpan(0, length);
            // Every byte is fetched before the media changes: a write that faults leaves it as it was.
            var status = Transfer(c, length, port, new IntoBuffer(buffer));
            if (status == NvmeStatus.Success)
                Namespace.Write(offset, data);
            return status;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>
    /// Moves <paramref name="length"/> bytes between the host and <paramref name="mover"/>'s side
    /// through the command's PRPs. The PRPs are all walked (and checked) before a byte moves; then the
    /// pages move in order, those that follow each other in IOVA space as one device access (a slot's
    /// pages usually do). A transfer to the host that faults on a page has written the pages before it,
    /// as a device's DMA would have; the fault is posted once.
    /// </summary>
    private static NvmeStatus Transfer<TMover>(in NvmeCommand c, int length, IDevicePort port, TMover mover) where TMover : struct, ITransferMover
    {
        Span<ulong> pages = stackalloc ulong[MaxPrpSegments];
        var status = WalkPrps(c.Prp1, c.Prp2, length, pages, port, out var count);
        if (status != NvmeStatus.Success)
            return status;
        var at = 0;
        for (var i = 0; i < count;)
        {
            var start = pages[i++];
            var run = Math.Min(length - at, PageSize - (int)(start & PageMask));
            while (i < count && pages[i] == start + (ulong)run)
            {
                run += Math.Min(length - at - run, PageSize);
                i++;
            }
            var outcome = mover.Move(port, start, at, run);
            if (!outcome.Ok)
            {
                // The run was refused whole; the pages before the one that faulted still move.
                if (mover.ToHost && outcome.FaultIova > start)
                    mover.Move(port, start, at, (int)(outcome.FaultIova - start));
                return NvmeStatus.DataTransferError;
            }
            at += run;
        }
        return NvmeStatus.Success;
    }

    /// <summary>One side of a transfer: what a piece of <c>length</c> bytes, <c>at</c> bytes into it, moves to or from host memory at an IOVA.</summary>
    private interface ITransferMover
    {
        bool ToHost { get; }

        DmaOutcome Move(IDevicePort port, ulong iova, int at, int length);
    }

    /// <summary>To the host from a buffer (Identify).</summary>
    private readonly struct FromBuffer(byte[] data) : ITransferMover
    {
        public bool ToHost => true;

        public DmaOutcome Move(IDevicePort port, ulong iova, int at, int length) => port.Write(iova, data.AsSpan(at, length));
    }

    /// <summary>From the host into a buffer (a Write's data, all fetched before the media changes).</summary>
    private readonly struct IntoBuffer(byte[] data) : ITransferMover
    {
        public bool ToHost => false;

        public DmaOutcome Move(IDevicePort port, ulong iova, int at, int length) => port.Read(iova, data.AsSpan(at, length));
    }

    /// <summary>To the host straight from the media (a Read): one copy, no staging buffer.</summary>
    private readonly struct FromMedia(NvmeNamespace media, ulong offset) : ITransferMover
    {
        public bool ToHost => true;

        public DmaOutcome Move(IDevicePort port, ulong iova, int at, int length) =>
            port.Write(iova, length, static (destination, within, m) => m.Media.Read(m.Offset + (ulong)within, destination), (Media: media, Offset: offset + (ulong)at));
    }

    /// <summary>
    /// The addresses of the transfer's pieces: PRP1 (dword aligned, any offset), then PRP2 as the
    /// second page or, for more than two pages, a PRP list read from the host (qword aligned; its last
    /// entry on a page chains to the next list page). Every entry after PRP1 must be page aligned:
    /// Invalid PRP Offset otherwise; a list the IOMMU refuses is a Data Transfer Error.
    /// </summary>
    private static NvmeStatus WalkPrps(ulong prp1, ulong prp2, int length, Span<ulong> pages, IDevicePort port, out int count)
    {
        count = 0;
        if ((prp1 & 3) != 0)
            return NvmeStatus.InvalidPrpOffset;
        pages[count++] = prp1;
        var remaining = length - Math.Min(length, PageSize - (int)(prp1 & PageMask));
        if (remaining == 0)
            return NvmeStatus.Success;
        if (remaining <= PageSize)
        {
            if ((prp2 & PageMask) != 0)
                return NvmeStatus.InvalidPrpOffset;
            pages[count++] = prp2;
            return NvmeStatus.Success;
        }
        if ((prp2 & 7) != 0)
            return NvmeStatus.InvalidPrpOffset;
        Span<byte> entries = stackalloc byte[MaxPrpSegments * sizeof(ulong)];
        var list = prp2;
        while (remaining > 0)
        {
            var needed = (remaining + PageSize - 1) / PageSize;
            var onPage = (int)((PageSize - (list & PageMask)) / sizeof(ulong));
            // More entries than fit on this list page: its last entry points to the next list page.
            var chained = needed > onPage;
            var read = chained ? onPage : needed;
            var bytes = entries[..(read * sizeof(ulong))];
            if (!port.Read(list, bytes).Ok)
                return NvmeStatus.DataTransferError;
            var dataEntries = chained ? read - 1 : read;
            for (var i = 0; i < dataEntries; i++)
            {
                var entry = BinaryPrimitives.ReadUInt64LittleEndian(bytes[(i * sizeof(ulong))..]);
                if ((entry & PageMask) != 0)
                    return NvmeStatus.InvalidPrpOffset;
                pages[count++] = entry;
                remaining -= Math.Min(remaining, PageSize);
            }
            if (chained)
            {
                list = BinaryPrimitives.ReadUInt64LittleEndian(bytes[(dataEntries * sizeof(ulong))..]);
                if ((list & PageMask) != 0)
                    return NvmeStatus.InvalidPrpOffset;
            }
        }
        return NvmeStatus.Success;
    }
}
