using System.Buffers.Binary;
using System.Text;
using DmaBroker.Client;

namespace DmaBroker.Samples.Nvme;

/// <summary>What Identify Controller and Identify Namespace 1 say.</summary>
/// <param name="Model">The model number (MN), trimmed.</param>
/// <param name="Serial">The serial number (SN), trimmed.</param>
/// <param name="Firmware">The firmware revision (FR), trimmed.</param>
/// <param name="MaxTransfer">MDTS in bytes (0: no limit).</param>
/// <param name="Namespaces">How many namespaces the controller has (NN).</param>
/// <param name="Blocks">Namespace 1's size in logical blocks (NSZE).</param>
/// <param name="BlockSize">Its logical block size in bytes, from its formatted LBA format.</param>
/// <param name="DoorbellBufferConfig">OACS bit 8: the controller takes Doorbell Buffer Config (shadow doorbells).</param>
public sealed record NvmeIdentity(string Model, string Serial, string Firmware, int MaxTransfer, uint Namespaces, ulong Blocks, int BlockSize,
    bool DoorbellBufferConfig = false)
{
    public ulong Bytes => Blocks * (ulong)BlockSize;
}

/// <summary>
/// A userspace NVMe driver's controller side, as SPDK's <c>nvme_ctrlr</c>: it maps its queues and
/// buffers into the container, resets and enables the controller through BAR0 (the CC/CSTS
/// handshake), runs admin commands on the admin queue pair (polled, as SPDK does), creates I/O
/// queue pairs and shuts the controller down. Its memory stays mapped until <see cref="ReleaseAsync"/>.
/// </summary>
public sealed class NvmeController : IAsyncDisposable
{
    public const uint Bar0 = 0;
    public const ulong RegCap = 0x00;
    public const ulong RegVs = 0x08;
    public const ulong RegCc = 0x14;
    public const ulong RegCsts = 0x1c;
    public const ulong RegAqa = 0x24;
    public const ulong RegAsq = 0x28;
    public const ulong RegAcq = 0x30;
    public const uint CcEnable = 1;
    public const uint CcShutdownNormal = 1 << 14;
    /// <summary>CC.IOSQES = 6 (64-byte entries), CC.IOCQES = 4 (16 bytes); CSS NVM, 4 KiB pages, round robin are all 0.</summary>
    public const uint CcEntrySizes = (6 << 16) | (4 << 20);
    public const uint CstsReady = 1;
    public const uint CstsFatal = 2;
    public const uint CstsShutdownMask = 3 << 2;
    public const uint CstsShutdownComplete = 2 << 2;
    public const int PageSize = 4096;
    public const int AdminEntries = 64;
    public const uint Namespace = 1;
    /// <summary>Identify Controller OACS (bytes 257:256) bit 8: Doorbell Buffer Config.</summary>
    public const ushort OacsDoorbellBufferConfig = 1 << 8;

    /// <summary>Where this driver starts placing its mappings: above 4 GiB, so 64-bit DMA addresses are used throughout.</summary>
    public const ulong IovaBase = 0x1_0000_0000;

    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(10);

    private readonly VfioBinding _vfio;
    private readonly Action<string> _log;
    private readonly List<(DmaBuffer Buffer, IovaMapping Mapping)> _mappings = [];
    private ulong _nextIova = IovaBase;
    private ushort _nextAdminCid;
    private NvmeQueuePair _admin = null!;
    private DmaBuffer _identify = null!;
    private ulong _identifyIova;
    private NvmeShadowDoorbells? _shadow;

    private NvmeController(VfioBinding vfio, Action<string> log, bool shared)
    {
        _vfio = vfio;
        _log = log;
        Shared = shared;
    }

    /// <summary>
    /// Whether the driver's queues, PRP lists and data buffers are shared memory (SPEC §15, a
    /// unix:// broker): the CPU reads and writes them as plain memory instead of Memory calls.
    /// </summary>
    public bool Shared { get; }

    /// <summary>The shadow doorbells once <see cref="ConfigureShadowDoorbellsAsync"/> set them up; the I/O queues created after use them.</summary>
    public NvmeShadowDoorbells? ShadowDoorbells => _shadow;

    /// <summary>CAP as read at start.</summary>
    public ulong Capabilities { get; private set; }

    /// <summary>How long the controller may take to become ready (CAP.TO, in 500 ms units).</summary>
    public TimeSpan ReadyTimeout => TimeSpan.FromMilliseconds(500 * (double)((Capabilities >> 24) & 0xff));

    /// <summary>I/O queues' largest size (CAP.MQES + 1).</summary>
    public int MaxQueueEntries => (int)(Capabilities & 0xffff) + 1;

    /// <summary>
    /// Maps the admin queues and an identify page, turns on Bus Master, resets the controller
    /// (CC.EN 1 → 0, waiting for CSTS.RDY to clear), programs AQA/ASQ/ACQ and enables it (waiting for RDY).
    /// </summary>
    public static async Task<NvmeController> StartAsync(VfioBinding vfio, Action<string> log, bool shared = false)
    {
        var controller = new NvmeController(vfio, log, shared);
        try
        {
            await controller.StartAsync();
            return controller;
        }
        catch
        {
            await controller.DisposeAsync();
            throw;
        }
    }

    private async Task StartAsync()
    {
        var device = _vfio.Device;
        var (asq, asqIova) = await MapAsync("admin SQ", AdminEntries * NvmeCommand.Size, deviceWrites: false);
        var (acq, acqIova) = await MapAsync("admin CQ", AdminEntries * NvmeCompletion.Size, deviceReads: false);
        (_identify, _identifyIova) = await MapAsync("identify buffer", PageSize, deviceReads: false);
        _admin = new NvmeQueuePair(0, AdminEntries, vector: null, _vfio, asq, acq);
        await device.EnableBusMasterAsync();

        Capabilities = await device.ReadRegisterAsync(Bar0, RegCap, 8);
        var vs = (uint)await device.ReadRegisterAsync(Bar0, RegVs);
        var minPage = 4096 << (int)((Capabilities >> 48) & 0xf);
        _log($"bus master on; CAP 0x{Capabilities:x16}: NVMe {vs >> 16}.{(vs >> 8) & 0xff}.{vs & 0xff}, queues up to {MaxQueueEntries} entries, pages from {minPage / 1024} KiB, ready within {ReadyTimeout.TotalSeconds:F1} s");
        if (minPage > PageSize)
            throw new NotSupportedException($"the controller's smallest page is {minPage} bytes; this driver uses {PageSize}");

        var cc = (uint)await device.ReadRegisterAsync(Bar0, RegCc);
        if ((cc & CcEnable) != 0)
            await device.WriteRegisterAsync(Bar0, RegCc, cc & ~CcEnable);
        await WaitForStatusAsync(CstsReady, 0, "CSTS.RDY to clear after CC.EN = 0");
        _log("reset: CC.EN = 0, CSTS.RDY = 0");

        await device.WriteRegisterAsync(Bar0, RegAqa, (AdminEntries - 1) | ((AdminEntries - 1) << 16));
        await device.WriteRegisterAsync(Bar0, RegAsq, asqIova, 8);
        await device.WriteRegisterAsync(Bar0, RegAcq, acqIova, 8);
        await device.WriteRegisterAsync(Bar0, RegCc, CcEntrySizes | CcEnable);
        await WaitForStatusAsync(CstsReady, CstsReady, "CSTS.RDY after CC.EN = 1");
        _log($"enabled: admin queues of {AdminEntries} entries at IOVA 0x{asqIova:x} / 0x{acqIova:x}, CC 0x{CcEntrySizes | CcEnable:x8}, CSTS.RDY = 1");
    }

    /// <summary>Identify Controller, then Identify Namespace 1.</summary>
    public async Task<NvmeIdentity> IdentifyAsync()
    {
        await AdminAsync(NvmeCommand.Identify(NvmeCommand.CnsController, 0, _identifyIova), "Identify Controller");
        var c = await _identify.ReadAsync(0, PageSize);
        await AdminAsync(NvmeCommand.Identify(NvmeCommand.CnsNamespace, Namespace, _identifyIova), "Identify Namespace");
        var n = await _identify.ReadAsync(0, PageSize);
        var mdts = c[77];
        var formatted = n[26] & 0xf;
        return new NvmeIdentity(
            Model: Ascii(c.AsSpan(24, 40)),
            Serial: Ascii(c.AsSpan(4, 20)),
            Firmware: Ascii(c.AsSpan(64, 8)),
            MaxTransfer: mdts == 0 ? 0 : PageSize << mdts,
            Namespaces: BinaryPrimitives.ReadUInt32LittleEndian(c.AsSpan(516)),
            Blocks: BinaryPrimitives.ReadUInt64LittleEndian(n),
            BlockSize: 1 << n[128 + (4 * formatted) + 2],
            DoorbellBufferConfig: (BinaryPrimitives.ReadUInt16LittleEndian(c.AsSpan(256)) & OacsDoorbellBufferConfig) != 0);
    }

    /// <summary>
    /// Doorbell Buffer Config, when the driver's memory is shared and the controller advertises it
    /// (<paramref name="identity"/>'s OACS): maps a shadow doorbell page and an EventIdx page and hands
    /// them to the controller, so that the I/O queues created afterwards submit and reap through plain
    /// memory and ring MMIO doorbells only when EventIdx asks for one. Over TCP there is no memory the
    /// two could share, so this does nothing there. Returns whether shadow doorbells are on.
    /// </summary>
    public async Task<bool> ConfigureShadowDoorbellsAsync(NvmeIdentity identity)
    {
        if (!Shared || !identity.DoorbellBufferConfig)
            return false;
        var (doorbells, doorbellsIova) = await MapAsync("shadow doorbells", PageSize);
        var (eventIndexes, eventIndexesIova) = await MapAsync("EventIdx page", PageSize);
        await AdminAsync(NvmeCommand.DoorbellBufferConfig(doorbellsIova, eventIndexesIova), "Doorbell Buffer Config");
        _shadow = new NvmeShadowDoorbells(doorbells, eventIndexes);
        _log($"shadow doorbells at IOVA 0x{doorbellsIova:x}, EventIdx at 0x{eventIndexesIova:x}: I/O doorbells are rung only when EventIdx asks");
        return true;
    }

    /// <summary>Set Features, Number of Queues: returns the I/O submission and completion queues the controller allocated.</summary>
    public async Task<(int SubmissionQueues, int CompletionQueues)> SetNumberOfQueuesAsync(int pairs)
    {
        var result = (await AdminAsync(NvmeCommand.SetNumberOfQueues(pairs, pairs), "Set Features (Number of Queues)")).Result;
        return ((int)(result & 0xffff) + 1, (int)(result >> 16) + 1);
    }

    /// <summary>
    /// Maps an I/O completion queue (the device writes it) and submission queue (the device reads
    /// it) of <paramref name="entries"/> each, and creates them: the completion queue first, on MSI-X
    /// <paramref name="vector"/> with interrupts enabled.
    /// </summary>
    public async Task<NvmeQueuePair> CreateIoQueuePairAsync(ushort qid, int entries, ushort vector)
    {
        if (entries < 2 || entries > MaxQueueEntries)
            throw new ArgumentOutOfRangeException(nameof(entries), entries, $"an I/O queue has 2 to {MaxQueueEntries} entries");
        var (cq, cqIova) = await MapAsync($"I/O CQ {qid}", entries * NvmeCompletion.Size, deviceReads: false);
        var (sq, sqIova) = await MapAsync($"I/O SQ {qid}", entries * NvmeCommand.Size, deviceWrites: false);
        await AdminAsync(NvmeCommand.CreateIoCq(qid, entries, cqIova, vector, interrupts: true), $"Create I/O CQ {qid}");
        await AdminAsync(NvmeCommand.CreateIoSq(qid, entries, sqIova, cqid: qid), $"Create I/O SQ {qid}");
        return new NvmeQueuePair(qid, entries, vector, _vfio, sq, cq, _shadow);
    }

    /// <summary>Deletes the pair's submission queue, then its completion queue (the order the specification requires).</summary>
    public async Task DeleteIoQueuePairAsync(NvmeQueuePair queue)
    {
        if (queue.Outstanding > 0)
            throw new InvalidOperationException($"queue {queue.Id} still has {queue.Outstanding} commands outstanding");
        await queue.FlushDoorbellsAsync();
        await AdminAsync(NvmeCommand.DeleteIoSq(queue.Id), $"Delete I/O SQ {queue.Id}");
        await AdminAsync(NvmeCommand.DeleteIoCq(queue.Id), $"Delete I/O CQ {queue.Id}");
    }

    /// <summary>Maps <paramref name="slots"/> data buffers of <paramref name="bytesPerSlot"/> each, with a PRP list page per slot.</summary>
    public async Task<NvmeIoBuffers> MapIoBuffersAsync(int slots, int bytesPerSlot)
    {
        var stride = (bytesPerSlot + PageSize - 1) / PageSize * PageSize;
        var (data, dataIova) = await MapAsync($"data ({slots} x {bytesPerSlot / 1024} KiB)", slots * stride);
        var (lists, listsIova) = await MapAsync("PRP lists", slots * PageSize, deviceWrites: false);
        var buffers = new NvmeIoBuffers((data, dataIova), (lists, listsIova), slots, stride, Namespace);
        await buffers.WritePrpListsAsync();
        return buffers;
    }

    /// <summary>
    /// The shutdown handshake: CC.SHN = normal, wait for CSTS.SHST = complete, then CC.EN = 0 and
    /// wait for CSTS.RDY to clear. Delete the I/O queues first.
    /// </summary>
    public async Task ShutdownAsync()
    {
        await _admin.FlushDoorbellsAsync();
        var device = _vfio.Device;
        var cc = (uint)await device.ReadRegisterAsync(Bar0, RegCc);
        await device.WriteRegisterAsync(Bar0, RegCc, cc | CcShutdownNormal);
        await WaitForStatusAsync(CstsShutdownMask, CstsShutdownComplete, "CSTS.SHST = complete after CC.SHN = normal");
        await device.WriteRegisterAsync(Bar0, RegCc, (cc | CcShutdownNormal) & ~CcEnable);
        await WaitForStatusAsync(CstsReady, 0, "CSTS.RDY to clear after CC.EN = 0");
        _log("shutdown: CC.SHN = normal, CSTS.SHST = complete; CC.EN = 0, CSTS.RDY = 0");
    }

    /// <summary>Unmaps every range this driver mapped and frees its memory.</summary>
    public async Task ReleaseAsync()
    {
        ulong unmapped = 0;
        for (var i = _mappings.Count - 1; i >= 0; i--)
        {
            var (buffer, mapping) = _mappings[i];
            unmapped += await mapping.UnmapAsync();
            await buffer.FreeAsync();
            _mappings.RemoveAt(i);
        }
        if (unmapped > 0)
            _log($"unmapped {unmapped / 1024} KiB of IOVA space and freed it");
    }

    /// <summary>As <see cref="ReleaseAsync"/> on a failing path: what is left goes with the session's end.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_vfio.Session.Ended.IsCompleted)
            return;
        try
        {
            await ReleaseAsync();
        }
        catch (BrokerException)
        {
            // The session's end unmaps and frees what is left.
        }
    }

    /// <summary>Runs one admin command and waits for it by polling the admin completion queue.</summary>
    private async Task<NvmeCompletion> AdminAsync(NvmeCommand command, string what)
    {
        await _admin.SubmitAsync([command with { Cid = _nextAdminCid++ }]);
        var completion = (await _admin.WaitAsync(CommandTimeout)).Single();
        return completion.EnsureOk(what);
    }

    /// <summary>Allocates session memory and maps it at the next free IOVA with the device access given.</summary>
    private async Task<(DmaBuffer Buffer, ulong Iova)> MapAsync(string what, int size, bool deviceReads = true, bool deviceWrites = true)
    {
        var buffer = await _vfio.Session.AllocateAsync((ulong)size, Shared);
        var mapping = await _vfio.Container.MapAsync(buffer, _nextIova, read: deviceReads, write: deviceWrites);
        _mappings.Add((buffer, mapping));
        // A page left unmapped after each range: a device access that runs over faults instead of landing in a neighbour.
        _nextIova += buffer.Size + PageSize;
        var access = (deviceReads, deviceWrites) switch
        {
            (true, true) => "device reads and writes",
            (true, false) => "device reads",
            _ => "device writes",
        };
        _log($"mapped {what}: {buffer.Size / 1024} KiB{(Shared ? " of shared memory" : "")} at vaddr 0x{buffer.Vaddr:x} to IOVA 0x{mapping.Iova:x} ({access})");
        return (buffer, mapping.Iova);
    }

    /// <summary>Reads CSTS until <c>CSTS &amp; mask == value</c>, within CAP.TO; a fatal status (CFS) fails at once.</summary>
    private async Task WaitForStatusAsync(uint mask, uint value, string what)
    {
        var deadline = DateTime.UtcNow + ReadyTimeout;
        while (true)
        {
            var csts = (uint)await _vfio.Device.ReadRegisterAsync(Bar0, RegCsts);
            if ((csts & CstsFatal) != 0)
                throw new InvalidOperationException($"controller fatal status (CSTS 0x{csts:x}) waiting for {what}");
            if ((csts & mask) == value)
                return;
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"no {what} within {ReadyTimeout.TotalSeconds:F1} s (CSTS 0x{csts:x})");
        }
    }

    private static string Ascii(ReadOnlySpan<byte> field) => Encoding.ASCII.GetString(field).TrimEnd(' ', '\0');
}
