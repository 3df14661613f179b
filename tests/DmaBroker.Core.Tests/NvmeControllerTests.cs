using System.Buffers.Binary;
using System.Text;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The NVMe model driven as a userspace driver drives it (SPEC §14): admin and I/O queues in session
/// memory, fetched and completed by DMA through the container's mappings; Identify, queue creation,
/// data at queue depth above one through PRP lists; every status code the model returns; ignored
/// doorbells; completion-queue backpressure and phase wrap; CSTS.CFS when a queue itself faults.
/// </summary>
public sealed class NvmeControllerTests : IAsyncLifetime
{
    // Pages of the driver's block: 0/1 admin SQ/CQ, 2/3 I/O SQ/CQ of queue 1, 4-5 PRP lists,
    // 8-47 data; 47 is mapped read-only; 48-63 are not mapped at all.
    private const int IoSq = 2;
    private const int IoCq = 3;
    private const int ListPage = 4;
    private const int DataPage = 8;
    private const int ReadOnlyPage = 47;
    private const int UnmappedPage = 48;
    private const ushort Vector = 3;
    private const ulong Blocks = (64UL << 20) / 512;

    private readonly NvmeTestDriver _d = NvmeTestDriver.Create(map: false);
    private readonly NvmeQueue _io;

    public NvmeControllerTests()
    {
        _d.Map(0, ReadOnlyPage);
        _d.Map(ReadOnlyPage, 1, read: true, write: false);
        _d.Enable();
        _io = _d.CreateIoQueuePair(1, IoSq, IoCq, entries: 16, Vector);
        _d.DrainEvents();
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public Task DisposeAsync() => _d.DisposeAsync().AsTask();

    private static ulong Data(int page, int offset = 0) => NvmeTestDriver.Iova(DataPage + page, offset);

    [Fact]
    public void Identify_ControllerNamespaceAndList_DescribeTheModel()
    {
        var controller = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 10, prp1: Data(0), cdw10: NvmeController.CnsController));
        // A PRP1 in the middle of a page: the rest of the structure goes to PRP2's page.
        var ns = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 11, nsid: 1, prp1: Data(2, 0x800), prp2: Data(4), cdw10: NvmeController.CnsNamespace));
        var list = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 12, prp1: Data(6), cdw10: NvmeController.CnsActiveNamespaces));
        var after = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 13, nsid: 1, prp1: Data(7), cdw10: NvmeController.CnsActiveNamespaces));

        Assert.All(new[] { controller, ns, list, after }, c => Assert.Equal(NvmeStatus.Success, c.Status));
        var id = _d.ReadHost(Data(0), 4096);
        Assert.Equal(0x144d, BinaryPrimitives.ReadUInt16LittleEndian(id));
        Assert.StartsWith("DmaBroker", Encoding.ASCII.GetString(id, 24, 40), StringComparison.Ordinal);
        Assert.Equal((5, 0x66, 0x44), (id[77], id[512], id[513]));           // MDTS, SQES, CQES
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(id.AsSpan(516))); // NN
        Assert.Equal(0x0001_0400u, BinaryPrimitives.ReadUInt32LittleEndian(id.AsSpan(80)));
        var nsData = _d.ReadHost(Data(2, 0x800), 0x800).Concat(_d.ReadHost(Data(4), 0x800)).ToArray();
        Assert.Equal(Blocks, BinaryPrimitives.ReadUInt64LittleEndian(nsData));       // NSZE
        Assert.Equal(Blocks, BinaryPrimitives.ReadUInt64LittleEndian(nsData.AsSpan(8)));
        Assert.Equal((0, 0, 9), (nsData[25], nsData[26], nsData[130]));               // NLBAF, FLBAS, LBADS
        Assert.Equal(new byte[0x800], _d.ReadHost(Data(3), 0x800));                   // the rest of PRP1's page untouched
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(_d.ReadHost(Data(6), 8)));
        Assert.Equal(0ul, BinaryPrimitives.ReadUInt64LittleEndian(_d.ReadHost(Data(6), 8).AsSpan()) >> 32);
        Assert.Equal(new byte[4096], _d.ReadHost(Data(7), 4096));
        Assert.Equal([new InterruptEvent(_d.Handle.Id, 0), new InterruptEvent(_d.Handle.Id, 0), new InterruptEvent(_d.Handle.Id, 0), new InterruptEvent(_d.Handle.Id, 0)], _d.DrainEvents());
    }

    [Fact]
    public void Features_NumberOfQueues_Reports64PairsAllocated()
    {
        var set = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminSetFeatures, 1, cdw10: NvmeController.FeatureNumberOfQueues, cdw11: 3 | (3u << 16)));
        var get = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminGetFeatures, 2, cdw10: NvmeController.FeatureNumberOfQueues));
        var abort = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminAbort, 3, cdw10: 1 | (7u << 16)));

        Assert.Equal((NvmeStatus.Success, 63u | (63u << 16)), (set.Status, set.Result));
        Assert.Equal((NvmeStatus.Success, 63u | (63u << 16)), (get.Status, get.Result));
        Assert.Equal((NvmeStatus.Success, 1u), (abort.Status, abort.Result)); // not aborted: nothing is ever outstanding
    }

    /// <summary>
    /// The driver's I/O path: 16 KiB writes at queue depth 6 through PRP lists (some with PRP1 in the
    /// middle of a page, so five pages and a list of four), one doorbell, one interrupt on the
    /// queue's vector; then reads of the same blocks into other buffers, at queue depth 6 again.
    /// </summary>
    [Fact]
    public void WriteThenRead_QueueDepthSixWithPrpLists_RoundTripsTheData()
    {
        const int commands = 6;
        const int blocks = 32; // 16 KiB
        var random = new Random(14);
        var written = new List<byte[]>();
        for (var i = 0; i < commands; i++)
        {
            var bytes = new byte[blocks * 512];
            random.NextBytes(bytes);
            written.Add(bytes);
            var offset = i % 2 == 0 ? 0 : 0x200;
            var buffer = Data(i * 5, offset);
            _d.WriteHost(buffer, bytes);
            var list = NvmeTestDriver.Iova(ListPage, i * 64);
            var pages = Enumerable.Range(1, offset == 0 ? 3 : 4).Select(p => Data((i * 5) + p));
            _d.WritePrpList(list, pages);
            _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoWrite, (ushort)(100 + i), lba: 1000 + ((ulong)i * blocks), blocks, buffer, list));
        }
        _d.Ring(_io);

        var writes = _d.Reap(_io);

        Assert.Equal(Enumerable.Range(100, commands).Select(c => ((ushort)c, NvmeStatus.Success, (ushort)1)), writes.Select(c => (c.Cid, c.Status, c.SqId)));
        Assert.Equal(Enumerable.Range(1, commands).Select(h => (ushort)h), writes.Select(c => c.SqHead));
        Assert.Equal([new InterruptEvent(_d.Handle.Id, Vector)], _d.DrainEvents());

        for (var i = 0; i < commands; i++)
        {
            // 8 KiB into a cleared buffer at a mid-page PRP1 spans three pages: PRP2 points to a list of two.
            var buffer = Data(i * 5, i * 4);
            _d.WriteHost(Data(i * 5), new byte[4 * 4096]);
            var list = NvmeTestDriver.Iova(ListPage + 1, i * 16);
            _d.WritePrpList(list, [Data((i * 5) + 1), Data((i * 5) + 2)]);
            // Command 0 starts on a page boundary: two pages, so PRP2 is the second page itself.
            _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, (ushort)(200 + i), lba: 1000 + ((ulong)i * blocks), blocks / 2, buffer, i == 0 ? Data(1) : list));
        }
        _d.Ring(_io);
        var reads = _d.Reap(_io);

        Assert.Equal(Enumerable.Range(0, commands).Select(_ => NvmeStatus.Success), reads.Select(c => c.Status));
        for (var i = 0; i < commands; i++)
            Assert.Equal(written[i][..(blocks * 256)], _d.ReadHost(Data(i * 5, i * 4), blocks * 256));
        Assert.Equal([new InterruptEvent(_d.Handle.Id, Vector)], _d.DrainEvents());
        Assert.Equal(commands * 4, _d.Controller.Namespace.ChunkCount); // 16 KiB each, 4 KiB-aligned: stored sparsely
    }

    [Fact]
    public void Read_NeverWrittenBlocks_AreZeros()
    {
        _d.WriteHost(Data(0), Enumerable.Repeat((byte)0xee, 4096).ToArray());

        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, 1, lba: Blocks - 8, 8, Data(0)));
        _d.Ring(_io);

        Assert.Equal(NvmeStatus.Success, Assert.Single(_d.Reap(_io)).Status);
        Assert.Equal(new byte[4096], _d.ReadHost(Data(0), 4096));
        Assert.Equal(0, _d.Controller.Namespace.ChunkCount);
    }

    [Fact]
    public void Transfer_LargestWithChainedPrpList_RoundTrips()
    {
        // 128 KiB (MDTS) from PRP1 at offset 0x100: 33 pages; the list starts 16 bytes before the end of
        // its page, so it holds one entry and a pointer to the next list page, which holds the other 31.
        var bytes = new byte[NvmeController.MaxTransfer];
        new Random(5).NextBytes(bytes);
        var first = Data(0, 0x100);
        var pages = Enumerable.Range(1, 32).Select(p => Data(p)).ToArray();
        _d.WriteHost(first, bytes);
        var list = NvmeTestDriver.Iova(ListPage, 4096 - 16);
        _d.WritePrpList(list, [pages[0], NvmeTestDriver.Iova(ListPage + 1)]);
        _d.WritePrpList(NvmeTestDriver.Iova(ListPage + 1), pages[1..]);

        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoWrite, 1, lba: 0, 256, first, list));
        _d.Ring(_io);
        Assert.Equal(NvmeStatus.Success, Assert.Single(_d.Reap(_io)).Status);
        _d.WriteHost(Data(0), new byte[33 * 4096]);

        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, 2, lba: 0, 256, first, list));
        _d.Ring(_io);

        Assert.Equal(NvmeStatus.Success, Assert.Single(_d.Reap(_io)).Status);
        Assert.Equal(bytes, _d.ReadHost(first, bytes.Length));
        Assert.Equal(new byte[0x100], _d.ReadHost(Data(0), 0x100));
    }

    public static TheoryData<string, string> StatusCases => new()
    {
        { "admin opcode 7Fh", nameof(NvmeStatus.InvalidOpcode) },
        { "admin fused", nameof(NvmeStatus.InvalidField) },
        { "admin SGL (PSDT 01b)", nameof(NvmeStatus.InvalidField) },
        { "Identify CNS 3", nameof(NvmeStatus.InvalidField) },
        { "Identify namespace 0", nameof(NvmeStatus.InvalidNamespace) },
        { "Identify namespace 2", nameof(NvmeStatus.InvalidNamespace) },
        { "Identify list after FFFFFFFEh", nameof(NvmeStatus.InvalidNamespace) },
        { "Identify into an unmapped page", nameof(NvmeStatus.DataTransferError) },
        { "Identify PRP1 not dword aligned", nameof(NvmeStatus.InvalidPrpOffset) },
        { "Get Features arbitration", nameof(NvmeStatus.InvalidField) },
        { "Get Features select 4", nameof(NvmeStatus.InvalidField) },
        { "Set Features queues FFFFh", nameof(NvmeStatus.InvalidField) },
        { "Set Features queues, save", nameof(NvmeStatus.FeatureNotSaveable) },
        { "Create CQ 0", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Create CQ 65", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Create CQ 1 again", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Create CQ of one entry", nameof(NvmeStatus.InvalidQueueSize) },
        { "Create CQ of 1025 entries", nameof(NvmeStatus.InvalidQueueSize) },
        { "Create CQ not page aligned", nameof(NvmeStatus.InvalidPrpOffset) },
        { "Create CQ not contiguous", nameof(NvmeStatus.InvalidField) },
        { "Create CQ vector 65", nameof(NvmeStatus.InvalidInterruptVector) },
        { "Create SQ on CQ 0", nameof(NvmeStatus.CompletionQueueInvalid) },
        { "Create SQ on missing CQ 9", nameof(NvmeStatus.CompletionQueueInvalid) },
        { "Create SQ 1 again", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Create SQ of 1025 entries", nameof(NvmeStatus.InvalidQueueSize) },
        { "Create SQ not contiguous", nameof(NvmeStatus.InvalidField) },
        { "Delete SQ 0", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Delete missing SQ 7", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Delete CQ 0", nameof(NvmeStatus.InvalidQueueIdentifier) },
        { "Delete CQ 1 with SQ 1 on it", nameof(NvmeStatus.InvalidQueueDeletion) },
        { "I/O opcode 7Fh", nameof(NvmeStatus.InvalidOpcode) },
        { "Write Zeroes (not supported)", nameof(NvmeStatus.InvalidOpcode) },
        { "I/O fused", nameof(NvmeStatus.InvalidField) },
        { "Read namespace 2", nameof(NvmeStatus.InvalidNamespace) },
        { "Flush namespace 2", nameof(NvmeStatus.InvalidNamespace) },
        { "Read over MDTS (257 blocks)", nameof(NvmeStatus.InvalidField) },
        { "Read at NSZE", nameof(NvmeStatus.LbaOutOfRange) },
        { "Read across the end", nameof(NvmeStatus.LbaOutOfRange) },
        { "Read at 2^64 - 1", nameof(NvmeStatus.LbaOutOfRange) },
        { "Read into an unmapped PRP1", nameof(NvmeStatus.DataTransferError) },
        { "Read into a read-only page", nameof(NvmeStatus.DataTransferError) },
        { "Write from an unmapped PRP2", nameof(NvmeStatus.DataTransferError) },
        { "PRP list in an unmapped page", nameof(NvmeStatus.DataTransferError) },
        { "PRP list entry not page aligned", nameof(NvmeStatus.InvalidPrpOffset) },
        { "PRP2 not page aligned", nameof(NvmeStatus.InvalidPrpOffset) },
        { "PRP list not qword aligned", nameof(NvmeStatus.InvalidPrpOffset) },
        { "PRP1 not dword aligned", nameof(NvmeStatus.InvalidPrpOffset) },
        { "Read the last block", nameof(NvmeStatus.Success) },
        { "Flush namespace 1", nameof(NvmeStatus.Success) },
        { "Flush every namespace", nameof(NvmeStatus.Success) },
    };

    [Theory]
    [MemberData(nameof(StatusCases))]
    public void Command_Case_CompletesWithTheSpecsStatus(string what, string expected)
    {
        var status = Enum.Parse<NvmeStatus>(expected);
        var (queue, command) = StatusCase(what);
        _d.WritePrpList(NvmeTestDriver.Iova(ListPage), [Data(1), Data(2), Data(3) + 0x10]);

        _d.Submit(queue, command);
        _d.Ring(queue);

        var c = Assert.Single(_d.Reap(queue));
        Assert.True(status == c.Status, $"{what}: {c.Status}");
        Assert.Equal((ushort)0x77, c.Cid);
        var faults = _d.DrainEvents().OfType<FaultEvent>().ToList();
        // A Data Transfer Error is an IOMMU fault, and the session is told of it (SPEC §6); nothing else faults.
        Assert.Equal(status == NvmeStatus.DataTransferError ? 1 : 0, faults.Count);
        Assert.Equal(NvmeController.CstsReady, _d.Csts);
    }

    private (NvmeQueue Queue, byte[] Command) StatusCase(string what)
    {
        const ushort cid = 0x77;
        static byte[] Admin(byte op, uint nsid = 0, ulong prp1 = 0, uint cdw10 = 0, uint cdw11 = 0, byte flags = 0) =>
            NvmeTestDriver.Command(op, cid, nsid, prp1 == 0 ? Data(0) : prp1, 0, cdw10, cdw11, flags: flags);
        byte[] Rw(byte op, ulong lba, int blocks, ulong prp1, ulong prp2 = 0, uint nsid = 1) => NvmeTestDriver.ReadWrite(op, cid, lba, blocks, prp1, prp2, nsid);
        var admin = _d.Admin;
        var io = _io;
        const uint queue2 = 2 | (15u << 16);
        return what switch
        {
            "admin opcode 7Fh" => (admin, Admin(0x7f)),
            "admin fused" => (admin, Admin(NvmeController.AdminGetFeatures, cdw10: 7, flags: 0x01)),
            "admin SGL (PSDT 01b)" => (admin, Admin(NvmeController.AdminIdentify, cdw10: 1, flags: 0x40)),
            "Identify CNS 3" => (admin, Admin(NvmeController.AdminIdentify, nsid: 1, cdw10: 3)),
            "Identify namespace 0" => (admin, Admin(NvmeController.AdminIdentify, nsid: 0, cdw10: 0)),
            "Identify namespace 2" => (admin, Admin(NvmeController.AdminIdentify, nsid: 2, cdw10: 0)),
            "Identify list after FFFFFFFEh" => (admin, Admin(NvmeController.AdminIdentify, nsid: 0xffff_fffe, cdw10: 2)),
            "Identify into an unmapped page" => (admin, Admin(NvmeController.AdminIdentify, prp1: NvmeTestDriver.Iova(UnmappedPage), cdw10: 1)),
            "Identify PRP1 not dword aligned" => (admin, Admin(NvmeController.AdminIdentify, prp1: Data(0, 2), cdw10: 1)),
            "Get Features arbitration" => (admin, Admin(NvmeController.AdminGetFeatures, cdw10: 1)),
            "Get Features select 4" => (admin, Admin(NvmeController.AdminGetFeatures, cdw10: 7 | (4u << 8))),
            "Set Features queues FFFFh" => (admin, Admin(NvmeController.AdminSetFeatures, cdw10: 7, cdw11: 0xffff)),
            "Set Features queues, save" => (admin, Admin(NvmeController.AdminSetFeatures, cdw10: 7 | 0x8000_0000, cdw11: 1)),
            "Create CQ 0" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: 15u << 16, cdw11: 1)),
            "Create CQ 65" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: 65 | (15u << 16), cdw11: 1)),
            "Create CQ 1 again" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: 1 | (15u << 16), cdw11: 1)),
            "Create CQ of one entry" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: 2, cdw11: 1)),
            "Create CQ of 1025 entries" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: 2 | (1024u << 16), cdw11: 1)),
            "Create CQ not page aligned" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0, 0x40), cdw10: queue2, cdw11: 1)),
            "Create CQ not contiguous" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: queue2, cdw11: 0)),
            "Create CQ vector 65" => (admin, Admin(NvmeController.AdminCreateCq, prp1: Data(0), cdw10: queue2, cdw11: 3 | (65u << 16))),
            "Create SQ on CQ 0" => (admin, Admin(NvmeController.AdminCreateSq, prp1: Data(0), cdw10: queue2, cdw11: 1)),
            "Create SQ on missing CQ 9" => (admin, Admin(NvmeController.AdminCreateSq, prp1: Data(0), cdw10: queue2, cdw11: 1 | (9u << 16))),
            "Create SQ 1 again" => (admin, Admin(NvmeController.AdminCreateSq, prp1: Data(0), cdw10: 1 | (15u << 16), cdw11: 1 | (1u << 16))),
            "Create SQ of 1025 entries" => (admin, Admin(NvmeController.AdminCreateSq, prp1: Data(0), cdw10: 2 | (1024u << 16), cdw11: 1 | (1u << 16))),
            "Create SQ not contiguous" => (admin, Admin(NvmeController.AdminCreateSq, prp1: Data(0), cdw10: queue2, cdw11: 1u << 16)),
            "Delete SQ 0" => (admin, Admin(NvmeController.AdminDeleteSq, cdw10: 0)),
            "Delete missing SQ 7" => (admin, Admin(NvmeController.AdminDeleteSq, cdw10: 7)),
            "Delete CQ 0" => (admin, Admin(NvmeController.AdminDeleteCq, cdw10: 0)),
            "Delete CQ 1 with SQ 1 on it" => (admin, Admin(NvmeController.AdminDeleteCq, cdw10: 1)),
            "I/O opcode 7Fh" => (io, NvmeTestDriver.Command(0x7f, cid, 1, Data(0))),
            "Write Zeroes (not supported)" => (io, NvmeTestDriver.Command(0x08, cid, 1, Data(0))),
            "I/O fused" => (io, NvmeTestDriver.Command(NvmeController.IoRead, cid, 1, Data(0), flags: 0x02)),
            "Read namespace 2" => (io, Rw(NvmeController.IoRead, 0, 1, Data(0), nsid: 2)),
            "Flush namespace 2" => (io, NvmeTestDriver.Command(NvmeController.IoFlush, cid, 2)),
            "Read over MDTS (257 blocks)" => (io, Rw(NvmeController.IoRead, 0, 257, Data(0), NvmeTestDriver.Iova(ListPage))),
            "Read at NSZE" => (io, Rw(NvmeController.IoRead, Blocks, 1, Data(0))),
            "Read across the end" => (io, Rw(NvmeController.IoRead, Blocks - 1, 2, Data(0))),
            "Read at 2^64 - 1" => (io, Rw(NvmeController.IoRead, ulong.MaxValue, 1, Data(0))),
            "Read into an unmapped PRP1" => (io, Rw(NvmeController.IoRead, 0, 8, NvmeTestDriver.Iova(UnmappedPage))),
            "Read into a read-only page" => (io, Rw(NvmeController.IoRead, 0, 8, NvmeTestDriver.Iova(ReadOnlyPage))),
            "Write from an unmapped PRP2" => (io, Rw(NvmeController.IoWrite, 0, 16, Data(0), NvmeTestDriver.Iova(UnmappedPage))),
            "PRP list in an unmapped page" => (io, Rw(NvmeController.IoRead, 0, 24, Data(0), NvmeTestDriver.Iova(UnmappedPage))),
            // The list's third entry is Data(3) + 0x10.
            "PRP list entry not page aligned" => (io, Rw(NvmeController.IoRead, 0, 32, Data(0), NvmeTestDriver.Iova(ListPage))),
            "PRP2 not page aligned" => (io, Rw(NvmeController.IoRead, 0, 16, Data(0), Data(1, 0x200))),
            "PRP list not qword aligned" => (io, Rw(NvmeController.IoRead, 0, 24, Data(0), NvmeTestDriver.Iova(ListPage, 4))),
            "PRP1 not dword aligned" => (io, Rw(NvmeController.IoRead, 0, 1, Data(0, 1))),
            "Read the last block" => (io, Rw(NvmeController.IoRead, Blocks - 1, 1, Data(0))),
            "Flush namespace 1" => (io, NvmeTestDriver.Command(NvmeController.IoFlush, cid, 1)),
            "Flush every namespace" => (io, NvmeTestDriver.Command(NvmeController.IoFlush, cid, uint.MaxValue)),
            _ => throw new ArgumentException($"no case '{what}'", nameof(what)),
        };
    }

    [Fact]
    public void Read_PrpTwoUnmapped_WritesThePageBeforeTheFaultAndPostsTheFault()
    {
        var bytes = new byte[8192];
        new Random(3).NextBytes(bytes);
        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoWrite, 1, lba: 64, 16, Data(0), Data(1)));
        _d.WriteHost(Data(0), bytes);
        _d.Ring(_io);
        _d.Reap(_io);
        _d.DrainEvents();

        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, 2, lba: 64, 16, Data(10), NvmeTestDriver.Iova(UnmappedPage + 1)));
        _d.Ring(_io);

        Assert.Equal(NvmeStatus.DataTransferError, Assert.Single(_d.Reap(_io)).Status);
        Assert.Equal(bytes[..4096], _d.ReadHost(Data(10), 4096));
        Assert.Equal(
            [new FaultEvent(NvmeTestDriver.Address, NvmeTestDriver.Iova(UnmappedPage + 1), DmaAccess.Write, FaultReason.Unmapped), new InterruptEvent(_d.Handle.Id, Vector)],
            _d.DrainEvents());
    }

    [Fact]
    public void Write_FromAReadOnlyMappingWithAFaultingPage_LeavesTheMediaUnchanged()
    {
        _d.WriteHost(NvmeTestDriver.Iova(ReadOnlyPage), Enumerable.Repeat((byte)0x5a, 4096).ToArray());
        // The device may read a read-only page: a write from it succeeds.
        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoWrite, 1, lba: 8, 8, NvmeTestDriver.Iova(ReadOnlyPage)));
        // Two pages, the second unmapped: nothing of the first reaches the media.
        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoWrite, 2, lba: 0, 16, NvmeTestDriver.Iova(ReadOnlyPage), NvmeTestDriver.Iova(UnmappedPage)));
        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, 3, lba: 0, 16, Data(0), Data(1)));
        _d.Ring(_io);

        Assert.Equal([NvmeStatus.Success, NvmeStatus.DataTransferError, NvmeStatus.Success], _d.Reap(_io).Select(c => c.Status));
        Assert.Equal(new byte[4096], _d.ReadHost(Data(0), 4096));
        Assert.Equal(Enumerable.Repeat((byte)0x5a, 4096), _d.ReadHost(Data(1), 4096));
        Assert.Equal(FaultReason.Unmapped, Assert.Single(_d.DrainEvents().OfType<FaultEvent>()).Reason);
    }

    /// <summary>Offset and width of a doorbell write, and its value: each is ignored and counted, and moves nothing.</summary>
    [Theory]
    [InlineData("SQ 1 tail = its size", 0x1008ul, 4u, 16ul)]
    [InlineData("CQ 1 head = its size", 0x100cul, 4u, 16ul)]
    [InlineData("SQ 0 tail far beyond", 0x1000ul, 4u, 0xffff_fffful)]
    [InlineData("SQ 5, never created", 0x1028ul, 4u, 1ul)]
    [InlineData("CQ 64, never created", 0x1204ul, 4u, 0ul)]
    [InlineData("beyond queue 64", 0x3ff8ul, 4u, 1ul)]
    [InlineData("a 2-byte doorbell", 0x1008ul, 2u, 1ul)]
    [InlineData("an 8-byte doorbell", 0x1008ul, 8u, 1ul)]
    [InlineData("a misaligned doorbell", 0x1009ul, 1u, 1ul)]
    public void Doorbell_Invalid_IsIgnoredAndCounted(string what, ulong offset, uint width, ulong value)
    {
        _d.Submit(_io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, 1, lba: 0, 1, Data(0)));
        var before = _d.Controller.IgnoredDoorbells;

        Assert.True(_d.Handle.MmioWrite(0, offset, width, value).Ok, what);

        Assert.Equal(before + 1, _d.Controller.IgnoredDoorbells);
        Assert.Null(_d.Poll(_io));
        Assert.Empty(_d.DrainEvents());
        _d.Ring(_io);
        Assert.Equal(NvmeStatus.Success, Assert.Single(_d.Reap(_io)).Status);
    }

    /// <summary>
    /// A completion queue of 4 entries holds 3: commands rung while it is full are not fetched until
    /// the head doorbell gives slots back. The phase tag flips each time the queue wraps.
    /// </summary>
    [Fact]
    public void CompletionQueueFull_CommandsWaitForTheHeadDoorbellAndPhaseFlipsOnWrap()
    {
        var q = _d.CreateIoQueuePair(2, 20, 21, entries: 4, vector: 2);
        _d.DrainEvents();
        for (var cid = 0; cid < 3; cid++)
            _d.Submit(q, NvmeTestDriver.Command(NvmeController.IoFlush, (ushort)cid, 1));
        _d.Ring(q);
        var first = new[] { _d.Poll(q), _d.Poll(q), _d.Poll(q), _d.Poll(q) };
        for (var cid = 3; cid < 6; cid++)
            _d.Submit(q, NvmeTestDriver.Command(NvmeController.IoFlush, (ushort)cid, 1));
        _d.Ring(q);
        Assert.Null(_d.Poll(q)); // full: nothing fetched

        _d.Write32(NvmeTestDriver.CqDoorbell(2), (uint)q.CqHead);

        var second = new[] { _d.Poll(q), _d.Poll(q), _d.Poll(q), _d.Poll(q) };
        Assert.Equal([(0, true, 1), (1, true, 2), (2, true, 3)], first[..3].Select(c => ((int)c!.Value.Cid, c.Value.Phase, (int)c.Value.SqHead)));
        Assert.Null(first[3]);
        Assert.Equal([(3, true, 0), (4, false, 1), (5, false, 2)], second[..3].Select(c => ((int)c!.Value.Cid, c.Value.Phase, (int)c.Value.SqHead)));
        Assert.Null(second[3]);
        Assert.Equal([new InterruptEvent(_d.Handle.Id, 2), new InterruptEvent(_d.Handle.Id, 2)], _d.DrainEvents());
    }

    [Fact]
    public void SubmissionQueueUnmapped_Doorbell_SetsFatalStatusPostsTheFaultAndResetRecovers()
    {
        var broken = _d.CreateIoQueuePair(2, UnmappedPage, 21, entries: 4, vector: 2);
        _d.DrainEvents();

        _d.Write32(NvmeTestDriver.SqDoorbell(2), 1);

        Assert.Equal(NvmeController.CstsReady | NvmeController.CstsFatal, _d.Csts);
        Assert.Equal([new FaultEvent(NvmeTestDriver.Address, NvmeTestDriver.Iova(UnmappedPage), DmaAccess.Read, FaultReason.Unmapped)], _d.DrainEvents());
        _ = broken;
        // A dead controller runs nothing: the working queue 1 is ignored too.
        _d.Submit(_io, NvmeTestDriver.Command(NvmeController.IoFlush, 1, 1));
        _d.Ring(_io);
        Assert.Null(_d.Poll(_io));

        _d.Write32(NvmeController.RegCc, 0);
        Assert.Equal(0u, _d.Csts);
        _d.Enable(entries: 4, sqPage: 6, cqPage: 7);
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 9, prp1: Data(0), cdw10: 1)).Status);
    }

    [Fact]
    public void InterruptMask_MaskedVector_IsHeldUntilIntmcUnmasksIt()
    {
        _d.Write32(NvmeController.RegIntms, 1u << Vector);
        _d.Submit(_io, NvmeTestDriver.Command(NvmeController.IoFlush, 1, 1));
        _d.Ring(_io);
        Assert.Empty(_d.DrainEvents());

        _d.Write32(NvmeController.RegIntmc, 1u << Vector);

        Assert.Equal([new InterruptEvent(_d.Handle.Id, Vector)], _d.DrainEvents());
        Assert.Single(_d.Reap(_io));
        _d.Write32(NvmeController.RegIntms, 1u << Vector);
        _d.Write32(NvmeController.RegIntmc, 1u << Vector);
        Assert.Empty(_d.DrainEvents()); // nothing left unconsumed: unmasking signals nothing
    }

    [Fact]
    public void DeleteQueues_InOrder_SucceedAndTheirDoorbellsAreIgnored()
    {
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminDeleteSq, 1, cdw10: 1)).Status);
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminDeleteCq, 2, cdw10: 1)).Status);
        var before = _d.Controller.IgnoredDoorbells;

        _d.Write32(NvmeTestDriver.SqDoorbell(1), 1);
        _d.Write32(NvmeTestDriver.CqDoorbell(1), 1);

        Assert.Equal(before + 2, _d.Controller.IgnoredDoorbells);
        // The ids are free again.
        _d.CreateIoQueuePair(1, IoSq, IoCq, entries: 8, Vector);
    }
}
