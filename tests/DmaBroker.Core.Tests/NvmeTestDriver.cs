using System.Buffers.Binary;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// A small userspace NVMe driver played against the core directly, as a VFIO driver would run: it
/// hands the default topology's NVMe drive (0000:01:00.0) from the kernel's <c>nvme</c> driver to
/// <c>vfio-pci</c>, claims its group into a TYPE1V2 container, allocates one block of session memory
/// and maps all of it at <see cref="IovaBase"/>, opens the device with Bus Master on, and then
/// programs it by register writes while it keeps its queues in that memory (the CPU's view).
/// </summary>
internal sealed class NvmeTestDriver : IAsyncDisposable
{
    public const ulong Page = NvmeController.PageSize;
    public const ulong IovaBase = 0x10_0000;
    public static readonly PciAddress Address = PciAddress.Parse("0000:01:00.0");

    private NvmeTestDriver(Broker broker, int pages)
    {
        Broker = broker;
        broker.Table.UnbindDriver(Address);
        broker.Table.BindDriver(Address, Drivers.VfioPci);
        Session = broker.Sessions.Open("nvme-driver");
        Container = broker.Vfio.CreateContainer(Session, ContainerType.Type1v2);
        broker.Vfio.SetContainer(Session, broker.Table.GetDevice(Address).Group.Id, Container.Id);
        Block = Session.Allocate((ulong)pages * Page);
        Pages = pages;
        Handle = broker.Vfio.OpenDevice(Session, Address);
        DmaRig.SetBusMaster(Handle, on: true);
    }

    public Broker Broker { get; }
    public Session Session { get; }
    public Container Container { get; }
    public MemoryBlock Block { get; }
    public int Pages { get; }
    public DeviceHandle Handle { get; }

    /// <summary>The model behind the handle, for what a driver cannot see (the ignored-doorbell count, the namespace's chunks).</summary>
    public NvmeController Controller => (NvmeController)Handle.Device.Model;

    /// <summary>A driver on the default topology whose block of <paramref name="pages"/> pages is mapped read-write unless <paramref name="map"/> is false.</summary>
    public static NvmeTestDriver Create(int pages = 64, bool map = true, Broker? broker = null)
    {
        var driver = new NvmeTestDriver(broker ?? new Broker(TopologyDocument.Default(), time: new FakeTimeProvider()), pages);
        if (map)
            driver.Map(0, pages);
        return driver;
    }

    /// <summary>Maps pages [first, first + count) of the block at their IOVAs.</summary>
    public void Map(int first, int count, bool read = true, bool write = true) =>
        Broker.Vfio.MapDma(Session, Container.Id, Block.Vaddr + (ulong)first * Page, Iova(first), (ulong)count * Page, read, write);

    public void Unmap(int first, int count) =>
        Broker.Vfio.UnmapDma(Session, Container.Id, Iova(first), (ulong)count * Page, all: false);

    /// <summary>The IOVA of byte <paramref name="offset"/> of page <paramref name="page"/> of the block.</summary>
    public static ulong Iova(int page, int offset = 0) => IovaBase + ((ulong)page * Page) + (ulong)offset;

    // ---- registers ----

    public uint Read32(ulong offset) => (uint)Handle.MmioRead(0, offset, 4);

    public ulong Read64(ulong offset) => Handle.MmioRead(0, offset, 8);

    public void Write32(ulong offset, uint value) => Assert.True(Handle.MmioWrite(0, offset, 4, value).Ok);

    public void Write64(ulong offset, ulong value) => Assert.True(Handle.MmioWrite(0, offset, 8, value).Ok);

    public uint Csts => Read32(NvmeController.RegCsts);

    /// <summary>The CC value a driver writes to enable: EN with the NVM command set, 4 KiB pages and 64/16-byte entries.</summary>
    public const uint EnableCc = NvmeController.CcEnable | (NvmeController.Iosqes << NvmeController.CcIosqesShift) | (NvmeController.Iocqes << NvmeController.CcIocqesShift);

    /// <summary>Programs the admin queues (submission queue on <paramref name="sqPage"/>, completion queue on <paramref name="cqPage"/>) and enables the controller.</summary>
    public NvmeQueue Enable(int entries = 16, int sqPage = 0, int cqPage = 1)
    {
        Write32(NvmeController.RegAqa, (uint)(entries - 1) | ((uint)(entries - 1) << 16));
        Write64(NvmeController.RegAsq, Iova(sqPage));
        Write64(NvmeController.RegAcq, Iova(cqPage));
        Write32(NvmeController.RegCc, EnableCc);
        Admin = new NvmeQueue(0, sqPage, cqPage, entries);
        return Admin;
    }

    /// <summary>The admin queue pair as the driver sees it, once enabled.</summary>
    public NvmeQueue Admin { get; private set; } = new(0, 0, 1, 2);

    // ---- queues in host memory ----

    public void WriteHost(ulong iova, ReadOnlySpan<byte> data) => Session.WriteMemory(Block.Vaddr + (iova - IovaBase), data);

    public byte[] ReadHost(ulong iova, int length)
    {
        var data = new byte[length];
        Session.ReadMemory(Block.Vaddr + (iova - IovaBase), data);
        return data;
    }

    /// <summary>Writes a command at the queue's tail and advances it, without ringing the doorbell.</summary>
    public void Submit(NvmeQueue queue, byte[] entry)
    {
        WriteHost(Iova(queue.SqPage) + (ulong)(queue.SqTail * NvmeController.SqEntrySize), entry);
        queue.SqTail = (queue.SqTail + 1) % queue.Size;
    }

    /// <summary>The submission queue's tail doorbell.</summary>
    public void Ring(NvmeQueue queue) => Write32(SqDoorbell(queue.Id), (uint)queue.SqTail);

    public static ulong SqDoorbell(int qid) => NvmeController.RegDoorbells + (8UL * (ulong)qid);

    public static ulong CqDoorbell(int qid) => NvmeController.RegDoorbells + (8UL * (ulong)qid) + 4;

    /// <summary>The next completion if its phase tag says it is new (the head advances past it), else null.</summary>
    public NvmeCompletion? Poll(NvmeQueue queue)
    {
        var entry = ReadHost(Iova(queue.CqPage) + (ulong)(queue.CqHead * NvmeController.CqEntrySize), NvmeController.CqEntrySize);
        var completion = NvmeCompletion.Parse(entry);
        if (completion.Phase != queue.Phase)
            return null;
        if (++queue.CqHead == queue.CqSize)
        {
            queue.CqHead = 0;
            queue.Phase = !queue.Phase;
        }
        return completion;
    }

    /// <summary>Every new completion, then the head doorbell that hands their slots back.</summary>
    public List<NvmeCompletion> Reap(NvmeQueue queue)
    {
        var all = new List<NvmeCompletion>();
        while (Poll(queue) is { } c)
            all.Add(c);
        if (all.Count > 0)
            Write32(CqDoorbell(queue.Id), (uint)queue.CqHead);
        return all;
    }

    /// <summary>Runs one admin command to completion.</summary>
    public NvmeCompletion AdminCommand(byte[] entry)
    {
        Submit(Admin, entry);
        Ring(Admin);
        return Assert.Single(Reap(Admin));
    }

    /// <summary>Creates I/O completion queue and submission queue <paramref name="qid"/> of <paramref name="entries"/> each, on the given pages, on vector <paramref name="vector"/>.</summary>
    public NvmeQueue CreateIoQueuePair(ushort qid, int sqPage, int cqPage, int entries, ushort vector)
    {
        var size = (uint)(entries - 1) << 16;
        Assert.Equal(NvmeStatus.Success, AdminCommand(Command(NvmeController.AdminCreateCq, 0xc0, prp1: Iova(cqPage), cdw10: qid | size, cdw11: 0b11 | ((uint)vector << 16))).Status);
        Assert.Equal(NvmeStatus.Success, AdminCommand(Command(NvmeController.AdminCreateSq, 0xc1, prp1: Iova(sqPage), cdw10: qid | size, cdw11: 1 | ((uint)qid << 16))).Status);
        return new NvmeQueue(qid, sqPage, cqPage, entries);
    }

    /// <summary>A 64-byte submission queue entry.</summary>
    public static byte[] Command(byte opcode, ushort cid, uint nsid = 0, ulong prp1 = 0, ulong prp2 = 0, uint cdw10 = 0, uint cdw11 = 0, uint cdw12 = 0, byte flags = 0)
    {
        var e = new byte[NvmeController.SqEntrySize];
        BinaryPrimitives.WriteUInt32LittleEndian(e, opcode | ((uint)flags << 8) | ((uint)cid << 16));
        BinaryPrimitives.WriteUInt32LittleEndian(e.AsSpan(4), nsid);
        BinaryPrimitives.WriteUInt64LittleEndian(e.AsSpan(24), prp1);
        BinaryPrimitives.WriteUInt64LittleEndian(e.AsSpan(32), prp2);
        BinaryPrimitives.WriteUInt32LittleEndian(e.AsSpan(40), cdw10);
        BinaryPrimitives.WriteUInt32LittleEndian(e.AsSpan(44), cdw11);
        BinaryPrimitives.WriteUInt32LittleEndian(e.AsSpan(48), cdw12);
        return e;
    }

    /// <summary>A Read or Write of <paramref name="blocks"/> LBAs from <paramref name="lba"/> on namespace 1.</summary>
    public static byte[] ReadWrite(byte opcode, ushort cid, ulong lba, int blocks, ulong prp1, ulong prp2 = 0, uint nsid = NvmeController.NamespaceId) =>
        Command(opcode, cid, nsid, prp1, prp2, cdw10: (uint)lba, cdw11: (uint)(lba >> 32), cdw12: (uint)(blocks - 1));

    /// <summary>Writes a PRP list of <paramref name="entries"/> at <paramref name="at"/>.</summary>
    public void WritePrpList(ulong at, IEnumerable<ulong> entries)
    {
        var list = entries.ToArray();
        var bytes = new byte[list.Length * sizeof(ulong)];
        for (var i = 0; i < list.Length; i++)
            BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(i * sizeof(ulong)), list[i]);
        WriteHost(at, bytes);
    }

    public List<SessionEvent> DrainEvents() => DmaRig.Drain(Session);

    public ValueTask DisposeAsync() => new(Broker.DisposeAsync().AsTask().WaitAsync(CoreState.Timeout));
}

/// <summary>A queue pair as the driver tracks it: where its rings are, its submission tail, its completion head and expected phase.</summary>
internal sealed class NvmeQueue(ushort id, int sqPage, int cqPage, int size)
{
    public ushort Id { get; } = id;
    public int SqPage { get; } = sqPage;
    public int CqPage { get; } = cqPage;
    public int Size { get; } = size;
    /// <summary>The completion queue's entries: as the submission queue's unless the test made them differ.</summary>
    public int CqSize { get; init; } = size;
    public int SqTail { get; set; }
    public int CqHead { get; set; }
    public bool Phase { get; set; } = true;
}

/// <summary>A 16-byte completion queue entry, decoded.</summary>
internal readonly record struct NvmeCompletion(uint Result, ushort SqHead, ushort SqId, ushort Cid, bool Phase, NvmeStatus Status)
{
    public static NvmeCompletion Parse(ReadOnlySpan<byte> e)
    {
        var dw2 = BinaryPrimitives.ReadUInt32LittleEndian(e[8..]);
        var dw3 = BinaryPrimitives.ReadUInt32LittleEndian(e[12..]);
        return new NvmeCompletion(BinaryPrimitives.ReadUInt32LittleEndian(e), (ushort)dw2, (ushort)(dw2 >> 16), (ushort)dw3, (dw3 & 0x1_0000) != 0, (NvmeStatus)(dw3 >> 17));
    }
}
