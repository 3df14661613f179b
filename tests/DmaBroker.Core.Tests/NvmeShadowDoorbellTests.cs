using System.Buffers.Binary;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Doorbell Buffer Config (admin 7Ch, NVMe 1.3) as QEMU's hw/nvme implements it: the controller reads
/// I/O queues' tails and heads from the driver's shadow page, writes EventIdx when it stops so the
/// driver knows when an MMIO doorbell is still needed, and keeps fetching while the driver moves the
/// shadow tail; every shadow access is translated by the IOMMU. The driver here follows Linux's
/// <c>nvme_dbbuf_update_and_check_event</c>: shadow value first, then the MMIO doorbell only when
/// the move passes EventIdx.
/// </summary>
public sealed class NvmeShadowDoorbellTests : IAsyncLifetime
{
    // Pages of the driver's block: 0/1 admin SQ/CQ, 2/3 I/O SQ/CQ of queue 1, 4 shadow doorbells,
    // 5 EventIdx, 8-15 data; 48-63 are not mapped.
    private const int IoSq = 2;
    private const int IoCq = 3;
    private const int ShadowPage = 4;
    private const int EventIdxPage = 5;
    private const int DataPage = 8;
    private const int UnmappedPage = 48;
    private const ushort Vector = 2;
    private const int SqSlot = 2; // queue 1's submission tail: dword 2 of each page
    private const int CqSlot = 3; // queue 1's completion head: dword 3

    private readonly NvmeTestDriver _d;
    private ushort _cid = 100;

    public NvmeShadowDoorbellTests()
    {
        // One device engine: a test holds it to see the controller's work between two of its turns.
        _d = NvmeTestDriver.Create(map: false, broker: new Broker(TopologyDocument.Default(), new BrokerOptions { DeviceThreads = 1 }, new FakeTimeProvider()));
        // The shadow page is a mapping of its own, so a test can unmap it alone.
        _d.Map(0, ShadowPage);
        _d.Map(ShadowPage, 1);
        _d.Map(ShadowPage + 1, UnmappedPage - ShadowPage - 1);
        _d.Enable();
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public Task DisposeAsync() => _d.DisposeAsync().AsTask();

    [Fact]
    public void Identify_Controller_AdvertisesDoorbellBufferConfigInOacs()
    {
        _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 1, prp1: Data(0), cdw10: NvmeController.CnsController));

        Assert.Equal(0x100, BinaryPrimitives.ReadUInt16LittleEndian(_d.ReadHost(Data(0) + 256, 2)));
    }

    [Theory]
    [InlineData(0UL, 1UL)]
    [InlineData(1UL, 0UL)]
    [InlineData(1UL + 8, 1UL)]
    [InlineData(1UL, 1UL + 0x800)]
    public void Config_PrpZeroOrNotPageAligned_InvalidFieldAndNotConfigured(ulong shadowPage, ulong eventIdxPage)
    {
        // 1 stands for a valid page here, so the table reads as the rule: 0 or not page aligned.
        ulong Address(ulong v) => v == 0 ? 0 : NvmeTestDriver.Iova(ShadowPage) + (v - 1);

        var completion = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminDoorbellBufferConfig, 1, prp1: Address(shadowPage), prp2: Address(eventIdxPage)));

        Assert.Equal(NvmeStatus.InvalidField, completion.Status);
        Assert.False(_d.Controller.ShadowDoorbells);
        Assert.Equal(new byte[8], _d.ReadHost(NvmeTestDriver.Iova(ShadowPage), 8));
    }

    [Fact]
    public void Config_Valid_ExistingQueuesCopiedToShadowAndEventIdx_AdminDoorbellsMirrored()
    {
        var io = CreateIoQueues(entries: 16);
        SubmitReads(io, 2);
        _d.Ring(io);
        Assert.Equal(2, PollAll(io).Count);

        Assert.Equal(NvmeStatus.Success, Configure().Status);

        Assert.True(_d.Controller.ShadowDoorbells);
        // Queue 1: tail 2 (as rung), head 0 (not yet rung); the admin queue's tail was 3 when the command ran.
        Assert.Equal((2u, 0u), (Shadow(SqSlot), Shadow(CqSlot)));
        Assert.Equal((2u, 0u), (EventIdx(SqSlot), EventIdx(CqSlot)));
        Assert.Equal(3u, Shadow(0));
        // As QEMU: the admin queue's MMIO doorbells stay authoritative and are copied into its shadow.
        _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminGetFeatures, 2, cdw10: NvmeController.FeatureNumberOfQueues));
        Assert.Equal((4u, 4u), (Shadow(0), Shadow(1)));
    }

    [Fact]
    public void MmioDoorbell_IoQueue_TakesTheShadowTailAndLeavesEventIdxAtIt()
    {
        var io = CreateIoQueues(entries: 16);
        Configure();
        SubmitReads(io, 3);
        SetShadow(SqSlot, 3);

        // A stale MMIO value: the shadow tail is what counts for an I/O queue (QEMU's nvme_process_sq).
        _d.Write32(NvmeTestDriver.SqDoorbell(1), 1);

        Assert.Equal([100, 101, 102], PollAll(io).Select(c => (int)c.Cid));
        Assert.Equal(3u, EventIdx(SqSlot));
        // Idle at 3: the driver's next command (3 -> 4) passes EventIdx, so it rings.
        Assert.True(NeedEvent(EventIdx(SqSlot), 4, 3, io.Size));
    }

    /// <summary>
    /// The point of it: the controller is still working through the commands one doorbell started
    /// (its first turn of 32 ran on the device engine, the next waits behind work the test holds
    /// there) when the driver adds five more by the shadow tail alone; EventIdx says no doorbell is
    /// needed, and none is rung: the controller's next turn runs all 13 and only then goes idle,
    /// EventIdx at the tail.
    /// </summary>
    [Fact]
    public async Task ShadowTail_MovedWhileControllerBusy_RunsWithoutMmioDoorbell()
    {
        var io = CreateIoQueues(entries: 64);
        Configure();
        _d.DrainEvents();
        SubmitReads(io, 40);
        SetShadow(SqSlot, 40);
        // The doorbell as a RegionWrite rings it, on the engine; queued between two pieces of work the
        // test holds, so the next turn the doorbell's work queues comes after the second.
        using var start = new ManualResetEventSlim();
        using var hold = new ManualResetEventSlim();
        var engines = _d.Broker.Engines;
        var started = engines.RunAsync(() => start.Wait());
        var rung = engines.RunAsync(() => _d.Ring(io));
        var held = engines.RunAsync(() => hold.Wait());
        start.Set();
        await rung.WaitAsync(CoreState.Timeout);
        var first = PollAll(io);

        Assert.Equal(NvmeController.CommandsPerSlice, first.Count);
        Assert.Equal(39u, EventIdx(SqSlot)); // busy: just behind the tail it saw
        SubmitReads(io, 5);
        SetShadow(SqSlot, 45);
        Assert.False(NeedEvent(EventIdx(SqSlot), 45, 40, io.Size));

        hold.Set();
        await Task.WhenAll(started, held).WaitAsync(CoreState.Timeout);
        // One engine thread runs work in order: once this has run, so has the controller's next turn.
        await engines.RunAsync(() => { }).WaitAsync(CoreState.Timeout);
        var rest = PollAll(io);

        Assert.Equal(Enumerable.Range(100, 45).Select(c => (ushort)c), first.Concat(rest).Select(c => c.Cid));
        Assert.All(first.Concat(rest), c => Assert.Equal(NvmeStatus.Success, c.Status));
        Assert.Equal(45u, EventIdx(SqSlot));
        Assert.Equal(0ul, _d.Controller.IgnoredDoorbells);
        // Each turn: one interrupt as its first entry lands in a queue the driver had emptied, one as it ends.
        var interrupt = new InterruptEvent(_d.Handle.Id, Vector);
        Assert.Equal([interrupt, interrupt, interrupt, interrupt], _d.DrainEvents());
    }

    [Fact]
    public void CompletionQueueFull_EventIdxAtHead_DriverRingsHeadDoorbellToResume()
    {
        var io = CreateIoQueues(entries: 4, sqEntries: 16);
        Configure();
        SubmitReads(io, 6);
        SetShadow(SqSlot, 6);
        _d.Ring(io);

        var first = PollAll(io);
        Assert.Equal(3, first.Count); // a ring of 4 holds 3
        Assert.Equal(0u, EventIdx(CqSlot));
        Assert.True(NeedEvent(EventIdx(CqSlot), 3, 0, 4));
        _d.Write32(NvmeTestDriver.CqDoorbell(1), 3);

        Assert.Equal([103, 104, 105], PollAll(io).Select(c => (int)c.Cid));
        Assert.Equal(6u, EventIdx(SqSlot));
    }

    [Fact]
    public void ControllerReset_DropsTheConfig_MmioDoorbellsCountAgain()
    {
        CreateIoQueues(entries: 16);
        Configure();
        var eventIdxBefore = _d.ReadHost(NvmeTestDriver.Iova(EventIdxPage), 16);

        _d.Write32(NvmeController.RegCc, 0);
        Assert.False(_d.Controller.ShadowDoorbells);
        var io = CreateIoQueues(entries: 16, enable: true);
        SubmitReads(io, 1);
        SetShadow(SqSlot, 7);
        _d.Ring(io);

        Assert.Equal([100], PollAll(io).Select(c => (int)c.Cid));
        Assert.Equal(eventIdxBefore, _d.ReadHost(NvmeTestDriver.Iova(EventIdxPage), 16));
    }

    [Fact]
    public void Config_ShadowPageUnmapped_DataTransferErrorFaultPostedNotConfigured()
    {
        CreateIoQueues(entries: 16);
        _d.DrainEvents();

        var completion = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminDoorbellBufferConfig, 1,
            prp1: NvmeTestDriver.Iova(UnmappedPage), prp2: NvmeTestDriver.Iova(EventIdxPage)));

        Assert.Equal(NvmeStatus.DataTransferError, completion.Status);
        Assert.False(_d.Controller.ShadowDoorbells);
        Assert.Contains(new FaultEvent(NvmeTestDriver.Address, NvmeTestDriver.Iova(UnmappedPage), DmaAccess.Write, FaultReason.Unmapped), _d.DrainEvents());
    }

    [Fact]
    public void ShadowPageUnmappedLater_DoorbellFaults_ControllerFatalAndFaultPosted()
    {
        var io = CreateIoQueues(entries: 16);
        Configure();
        _d.Unmap(ShadowPage, 1);
        _d.DrainEvents();
        SubmitReads(io, 1);

        _d.Ring(io);

        Assert.Equal(NvmeController.CstsFatal, _d.Csts & NvmeController.CstsFatal);
        Assert.Null(_d.Poll(io));
        Assert.Equal([new FaultEvent(NvmeTestDriver.Address, NvmeTestDriver.Iova(ShadowPage), DmaAccess.Read, FaultReason.Unmapped)], _d.DrainEvents());
    }

    /// <summary>
    /// The driver's MMIO head doorbells are sent without waiting, so one can land after the driver
    /// has moved the shadow head on: the controller must not take the head back and post over
    /// completions the driver has not read (a completion queue smaller than its submission queue).
    /// </summary>
    [Fact]
    public void LateMmioHeadDoorbell_BehindTheShadowHead_DoesNotOverwriteUnconsumedCompletions()
    {
        var io = CreateIoQueues(entries: 4, sqEntries: 16);
        Configure();
        SubmitReads(io, 10);
        SetShadow(SqSlot, 10);
        _d.Ring(io);
        Assert.Equal([100, 101, 102], PollAll(io).Select(c => (int)c.Cid)); // head 3 in the shadow; the driver's MMIO head doorbell (3) is still on its way
        _d.Write32(NvmeTestDriver.SqDoorbell(1), 10); // any wake-up: the controller reads the shadow head 3
        var got = new List<int> { _d.Poll(io)!.Value.Cid, _d.Poll(io)!.Value.Cid }; // 103, 104: head 1
        SetShadow(CqSlot, (uint)io.CqHead);
        _d.Write32(NvmeTestDriver.SqDoorbell(1), 10); // the controller reads shadow head 1, posts 106, 107
        _d.Write32(NvmeTestDriver.CqDoorbell(1), 3); // the late MMIO head doorbell
        while (_d.Poll(io) is { } c)
            got.Add(c.Cid);
        var ring = string.Join(" ", Enumerable.Range(0, 4).Select(i => NvmeCompletion.Parse(_d.ReadHost(NvmeTestDriver.Iova(IoCq) + (ulong)(i * 16), 16))).Select(c => $"{c.Cid}/{(c.Phase ? 1 : 0)}"));
        Assert.True(got.SequenceEqual([103, 104, 105, 106, 107]), $"got {string.Join(",", got)}; ring {ring}; driver head {io.CqHead} phase {io.Phase}");
    }

    /// <summary>
    /// A submission queue deleted at tail 3 and created again starts at tail 0: the old shadow tail
    /// must not have its old commands fetched again when another queue's doorbell resumes the
    /// completion queue's submission queues.
    /// </summary>
    [Fact]
    public void RecreatedSq_StaleShadowTail_NotFetchedBeforeItsDoorbell()
    {
        var io = CreateIoQueues(entries: 16);
        Configure();
        SubmitReads(io, 3);
        SetShadow(SqSlot, 3);
        _d.Ring(io);
        Assert.Equal(3, PollAll(io).Count);
        // SQ 1 deleted and created again on CQ 1 (tail 0); SQ 2 shares CQ 1.
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminDeleteSq, 7, cdw10: 1)).Status);
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminCreateSq, 8, prp1: NvmeTestDriver.Iova(IoSq), cdw10: 1 | (15u << 16), cdw11: 1 | (1u << 16))).Status);
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminCreateSq, 9, prp1: NvmeTestDriver.Iova(6), cdw10: 2 | (15u << 16), cdw11: 1 | (1u << 16))).Status);
        var sq2 = new NvmeQueue(2, 6, IoCq, 16);
        _d.Submit(sq2, NvmeTestDriver.ReadWrite(NvmeController.IoRead, 200, lba: 0, blocks: 1, Data(0)));
        SetShadow(4, 1);
        _d.Write32(NvmeTestDriver.SqDoorbell(2), 1);
        Assert.Equal([200], PollAll(io).Select(c => (int)c.Cid));
        _d.Write32(NvmeTestDriver.CqDoorbell(1), (uint)io.CqHead); // the head doorbell resumes every SQ on CQ 1
        var extra = new List<int>();
        while (_d.Poll(io) is { } c)
            extra.Add(c.Cid);
        Assert.True(extra.Count == 0, $"phantom completions: {string.Join(",", extra)}");
    }

    // ---- the driver's side ----

    private static ulong Data(int page) => NvmeTestDriver.Iova(DataPage + page);

    private NvmeQueue CreateIoQueues(int entries, int? sqEntries = null, bool enable = false)
    {
        if (enable)
        {
            // A driver clears its rings before it enables the controller again: old entries' phase tags would read as new.
            _d.WriteHost(NvmeTestDriver.Iova(0), new byte[4 * (int)NvmeTestDriver.Page]);
            _d.Enable();
        }
        var size = (uint)(entries - 1) << 16;
        var sqSize = (uint)((sqEntries ?? entries) - 1) << 16;
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminCreateCq, 1, prp1: NvmeTestDriver.Iova(IoCq), cdw10: 1 | size, cdw11: 0b11 | ((uint)Vector << 16))).Status);
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminCreateSq, 2, prp1: NvmeTestDriver.Iova(IoSq), cdw10: 1 | sqSize, cdw11: 1 | (1u << 16))).Status);
        return new NvmeQueue(1, IoSq, IoCq, sqEntries ?? entries) { CqSize = entries };
    }

    private NvmeCompletion Configure() =>
        _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminDoorbellBufferConfig, 3, prp1: NvmeTestDriver.Iova(ShadowPage), prp2: NvmeTestDriver.Iova(EventIdxPage)));

    /// <summary>One-block reads of LBA 0 into the data pages, command ids from 100, written after the tail (no doorbell).</summary>
    private void SubmitReads(NvmeQueue io, int count)
    {
        for (var i = 0; i < count; i++)
            _d.Submit(io, NvmeTestDriver.ReadWrite(NvmeController.IoRead, _cid++, lba: 0, blocks: 1, Data(i % 8)));
    }

    /// <summary>Every completion posted so far, by phase tag, then the new head in the shadow page (no MMIO doorbell).</summary>
    private List<NvmeCompletion> PollAll(NvmeQueue io)
    {
        var all = new List<NvmeCompletion>();
        while (_d.Poll(io) is { } c)
            all.Add(c);
        SetShadow(CqSlot, (uint)io.CqHead);
        return all;
    }

    private void SetShadow(int slot, uint value)
    {
        var bytes = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(bytes, value);
        _d.WriteHost(NvmeTestDriver.Iova(ShadowPage, slot * 4), bytes);
    }

    private uint Shadow(int slot) => BinaryPrimitives.ReadUInt32LittleEndian(_d.ReadHost(NvmeTestDriver.Iova(ShadowPage, slot * 4), 4));

    private uint EventIdx(int slot) => BinaryPrimitives.ReadUInt32LittleEndian(_d.ReadHost(NvmeTestDriver.Iova(EventIdxPage, slot * 4), 4));

    /// <summary>Linux's nvme_dbbuf_need_event, in ring positions: the move from old to value passes EventIdx.</summary>
    private static bool NeedEvent(uint eventIdx, int value, int old, int entries) =>
        ((value - (int)eventIdx - 1) % entries + entries) % entries < ((value - old) % entries + entries) % entries;
}
