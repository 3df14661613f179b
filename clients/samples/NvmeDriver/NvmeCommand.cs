using System.Buffers.Binary;

namespace DmaBroker.Samples.Nvme;

/// <summary>
/// A 64-byte submission queue entry (NVMe 1.4 figure 105), the fields this driver uses: opcode,
/// command id, namespace, PRP1/PRP2 and command dwords 10-12. The factories build the admin and
/// I/O commands the driver issues.
/// </summary>
public readonly record struct NvmeCommand(byte Opcode, ushort Cid = 0, uint Nsid = 0, ulong Prp1 = 0, ulong Prp2 = 0,
    uint Cdw10 = 0, uint Cdw11 = 0, uint Cdw12 = 0)
{
    /// <summary>The size of a submission queue entry (CC.IOSQES = 6).</summary>
    public const int Size = 64;

    public const byte AdminDeleteSq = 0x00;
    public const byte AdminCreateSq = 0x01;
    public const byte AdminDeleteCq = 0x04;
    public const byte AdminCreateCq = 0x05;
    public const byte AdminIdentify = 0x06;
    public const byte AdminSetFeatures = 0x09;
    public const byte AdminDoorbellBufferConfig = 0x7c;
    public const byte IoWrite = 0x01;
    public const byte IoRead = 0x02;
    public const byte FeatureNumberOfQueues = 0x07;
    public const byte CnsNamespace = 0;
    public const byte CnsController = 1;

    /// <summary>Lays the entry out little-endian in <paramref name="entry"/> (64 bytes; the rest of it zero).</summary>
    public void WriteTo(Span<byte> entry)
    {
        entry[..Size].Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(entry, Opcode | ((uint)Cid << 16));
        BinaryPrimitives.WriteUInt32LittleEndian(entry[4..], Nsid);
        BinaryPrimitives.WriteUInt64LittleEndian(entry[24..], Prp1);
        BinaryPrimitives.WriteUInt64LittleEndian(entry[32..], Prp2);
        BinaryPrimitives.WriteUInt32LittleEndian(entry[40..], Cdw10);
        BinaryPrimitives.WriteUInt32LittleEndian(entry[44..], Cdw11);
        BinaryPrimitives.WriteUInt32LittleEndian(entry[48..], Cdw12);
    }

    /// <summary>Identify (CNS 1 controller, CNS 0 namespace <paramref name="nsid"/>) into the 4 KiB page at <paramref name="iova"/>.</summary>
    public static NvmeCommand Identify(byte cns, uint nsid, ulong iova) => new(AdminIdentify, Nsid: nsid, Prp1: iova, Cdw10: cns);

    /// <summary>Set Features, Number of Queues: asks for this many I/O submission and completion queues (CDW11, both 0-based).</summary>
    public static NvmeCommand SetNumberOfQueues(int submissionQueues, int completionQueues) =>
        new(AdminSetFeatures, Cdw10: FeatureNumberOfQueues, Cdw11: (uint)(submissionQueues - 1) | ((uint)(completionQueues - 1) << 16));

    /// <summary>Create I/O Completion Queue: physically contiguous (PC), on MSI-X <paramref name="vector"/>, interrupts enabled (IEN) or not.</summary>
    public static NvmeCommand CreateIoCq(ushort qid, int entries, ulong iova, ushort vector, bool interrupts) =>
        new(AdminCreateCq, Prp1: iova, Cdw10: qid | ((uint)(entries - 1) << 16), Cdw11: 1u | (interrupts ? 2u : 0) | ((uint)vector << 16));

    /// <summary>Create I/O Submission Queue: physically contiguous, completing into queue <paramref name="cqid"/>.</summary>
    public static NvmeCommand CreateIoSq(ushort qid, int entries, ulong iova, ushort cqid) =>
        new(AdminCreateSq, Prp1: iova, Cdw10: qid | ((uint)(entries - 1) << 16), Cdw11: 1u | ((uint)cqid << 16));

    /// <summary>Doorbell Buffer Config: the shadow doorbell page (PRP1) and the EventIdx page (PRP2), both page aligned.</summary>
    public static NvmeCommand DoorbellBufferConfig(ulong shadowDoorbells, ulong eventIndexes) =>
        new(AdminDoorbellBufferConfig, Prp1: shadowDoorbells, Prp2: eventIndexes);

    public static NvmeCommand DeleteIoSq(ushort qid) => new(AdminDeleteSq, Cdw10: qid);

    public static NvmeCommand DeleteIoCq(ushort qid) => new(AdminDeleteCq, Cdw10: qid);

    /// <summary>Read or Write of <paramref name="blocks"/> logical blocks from <paramref name="lba"/> on namespace <paramref name="nsid"/>.</summary>
    public static NvmeCommand ReadWrite(byte opcode, uint nsid, ulong lba, int blocks, ulong prp1, ulong prp2) =>
        new(opcode, Nsid: nsid, Prp1: prp1, Prp2: prp2, Cdw10: (uint)lba, Cdw11: (uint)(lba >> 32), Cdw12: (uint)(blocks - 1));
}

/// <summary>A 16-byte completion queue entry (NVMe 1.4 figure 121), without its phase tag.</summary>
/// <param name="Result">Dword 0, command specific (Set Features: the queues allocated).</param>
/// <param name="SqHead">Where the controller's fetching has reached in the submission queue.</param>
/// <param name="SqId">The submission queue the command came from.</param>
/// <param name="Cid">The command's id, as the driver set it.</param>
/// <param name="Status">The 15-bit status field: SC (bits 7:0), SCT (10:8), DNR (14).</param>
public readonly record struct NvmeCompletion(uint Result, ushort SqHead, ushort SqId, ushort Cid, ushort Status)
{
    /// <summary>The size of a completion queue entry (CC.IOCQES = 4).</summary>
    public const int Size = 16;

    /// <summary>Status code type 0, status code 0.</summary>
    public bool Ok => (Status & 0x7ff) == 0;

    /// <summary>The phase tag of an entry (dword 3 bit 16), which tells a new entry from an old one.</summary>
    public static bool Phase(ReadOnlySpan<byte> entry) => (BinaryPrimitives.ReadUInt32LittleEndian(entry[12..]) & 0x1_0000) != 0;

    public static NvmeCompletion Parse(ReadOnlySpan<byte> entry)
    {
        var dw2 = BinaryPrimitives.ReadUInt32LittleEndian(entry[8..]);
        var dw3 = BinaryPrimitives.ReadUInt32LittleEndian(entry[12..]);
        return new NvmeCompletion(BinaryPrimitives.ReadUInt32LittleEndian(entry), (ushort)dw2, (ushort)(dw2 >> 16), (ushort)dw3, (ushort)(dw3 >> 17));
    }

    /// <summary>This completion if it succeeded; otherwise throws <see cref="NvmeCommandException"/> naming <paramref name="what"/>.</summary>
    public NvmeCompletion EnsureOk(string what) => Ok ? this : throw new NvmeCommandException(what, this);

    /// <summary>The status as the specification names it, e.g. "LBA Out of Range (SCT 0, SC 0x80, DNR)".</summary>
    public string Describe()
    {
        var (sct, sc) = ((Status >> 8) & 7, Status & 0xff);
        var name = (sct, sc) switch
        {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x13) => "Invalid PRP Offset",
            (0, 0x80) => "LBA Out of Range",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x08) => "Invalid Interrupt Vector",
            (1, 0x0c) => "Invalid Queue Deletion",
            (1, 0x0d) => "Feature Identifier Not Saveable",
            _ => "status",
        };
        return $"{name} (SCT {sct}, SC 0x{sc:x2}{((Status & 0x4000) != 0 ? ", DNR" : "")})";
    }
}

/// <summary>A command the controller completed with an error status.</summary>
public sealed class NvmeCommandException(string what, NvmeCompletion completion)
    : Exception($"{what}: {completion.Describe()}")
{
    public NvmeCompletion Completion { get; } = completion;
}
