using DmaBroker.Client;
using DmaBroker.Samples.Nvme;

namespace DmaBroker.Benchmarks;

/// <summary>
/// The NvmeDriver sample's own classes set up for a benchmark: the controller of 0000:01:00.0 taken
/// from nvme, one I/O queue pair with its MSI-X vector, one buffer slot per command in flight, and
/// the region the reads cycle over written once (so reads return written data rather than
/// never-written zeros). With <c>shared</c>, its memory is shared (SPEC §15; a unix:// client).
/// </summary>
internal sealed class NvmeBenchDriver : IAsyncDisposable
{
    public const string Address = "0000:01:00.0";
    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(10);

    private readonly VfioBinding _vfio;
    private readonly NvmeController _controller;
    private readonly int _regionBytes;
    private readonly int _queueDepth;

    private NvmeBenchDriver(VfioBinding vfio, NvmeController controller, NvmeIdentity identity, NvmeQueuePair queue, NvmeIoBuffers buffers, int queueDepth, int regionBytes)
    {
        (_vfio, _controller, Identity, Queue, Buffers) = (vfio, controller, identity, queue, buffers);
        (_queueDepth, _regionBytes) = (queueDepth, regionBytes);
    }

    public NvmeIdentity Identity { get; }
    public NvmeQueuePair Queue { get; }
    public NvmeIoBuffers Buffers { get; }

    /// <summary>Completions per interrupt taken, one entry per measured stretch (a benchmark's bookkeeping).</summary>
    public List<double> CommandsPerInterrupt { get; } = [];

    /// <summary>MMIO doorbells (SQ tail and CQ head) per command, one entry per measured stretch.</summary>
    public List<double> DoorbellsPerCommand { get; } = [];

    public static async Task<NvmeBenchDriver> StartAsync(BrokerClient client, string name, int queueDepth, int largestRead, int regionBytes, bool shared = false)
    {
        var vfio = await VfioBinding.OpenAsync(client, Address, "nvme", name, _ => { });
        var controller = await NvmeController.StartAsync(vfio, _ => { }, shared);
        var id = await controller.IdentifyAsync();
        // Shared memory only (the local path): shadow doorbells, so the controller's copy and the driver's reads overlap.
        await controller.ConfigureShadowDoorbellsAsync(id);
        await controller.SetNumberOfQueuesAsync(1);
        var queue = await controller.CreateIoQueuePairAsync(qid: 1, entries: queueDepth + 1, vector: 1);
        var buffers = await controller.MapIoBuffersAsync(queueDepth, largestRead);
        var blocks = largestRead / id.BlockSize;
        await queue.RunAsync(regionBytes / largestRead, queueDepth,
            (i, slot) => Task.FromResult(buffers.Command(NvmeCommand.IoWrite, slot, (ulong)(i * blocks), blocks, id.BlockSize)),
            (_, _) => Task.CompletedTask, CommandTimeout);
        return new NvmeBenchDriver(vfio, controller, id, queue, buffers, queueDepth, regionBytes);
    }

    /// <summary>Reads of <paramref name="size"/> bytes cycling over the written region for <paramref name="duration"/>, at the queue depth, each handed to <paramref name="completed"/>; how many completed.</summary>
    public Task<long> ReadAsync(int size, TimeSpan duration, Func<long, ushort, Task> completed)
    {
        var blocks = size / Identity.BlockSize;
        var regionBlocks = _regionBytes / Identity.BlockSize;
        var stop = new CancellationTokenSource(duration);
        return Run();

        async Task<long> Run()
        {
            using (stop)
            {
                return await Queue.RunAsync(long.MaxValue, _queueDepth,
                    (i, slot) => Task.FromResult(Buffers.Command(NvmeCommand.IoRead, slot, (ulong)(i * blocks % regionBlocks), blocks, Identity.BlockSize)),
                    completed, CommandTimeout, stop.Token);
            }
        }
    }

    /// <summary>Deletes the queue pair, shuts the controller down and gives it back to nvme.</summary>
    public async ValueTask DisposeAsync()
    {
        await _controller.DeleteIoQueuePairAsync(Queue);
        await _controller.ShutdownAsync();
        await _controller.ReleaseAsync();
        await _vfio.CloseAsync();
        await _controller.DisposeAsync();
        await _vfio.DisposeAsync();
    }
}
