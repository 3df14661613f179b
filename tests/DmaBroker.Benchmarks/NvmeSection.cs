using System.Diagnostics;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Benchmarks;

/// <summary>
/// NVMe reads of 4 KiB and 128 KiB at queue depth 32, driven as the NvmeDriver sample drives them
/// (its own classes: the client library, a queue pair in session memory, PRP lists, doorbells on
/// the DMA channel, completions by MSI-X interrupt on the session's events), beside edu DMA of the
/// same sizes with as many in flight: the device writing host memory over <c>Dma.Stream</c>, the
/// direction of a read's data. One in-process broker serves both, in alternating rounds after a
/// warm-up round. An NVMe
/// read moves its data from the namespace to session memory inside the broker; the row "CPU reads
/// the data" adds what the sample does to check it, a Memory.Read of every block.
/// </summary>
internal sealed class NvmeSection : IBenchSection
{
    private const int QueueDepth = 32;
    private const string EduAddress = "0000:08:00.0";
    private const uint EduGroup = 14;
    private const int LargestRead = 128 * 1024;
    /// <summary>The range the reads cycle over, written once before they start, so they return data rather than never-written zeros.</summary>
    private const int RegionBytes = 16 * 1024 * 1024;

    public string Key => "nvme";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        const int queueDepth = QueueDepth;
        await using var broker = await Host.StartBrokerAsync();
        using var client = BrokerClient.Connect(broker.Address);

        await using var nvme = await NvmeBenchDriver.StartAsync(client, "bench-nvme", queueDepth, LargestRead, RegionBytes);
        var id = nvme.Identity;

        await using var eduSession = await client.OpenSessionAsync("bench-edu");
        var container = await eduSession.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(EduGroup);
        var eduMemory = await eduSession.AllocateAsync((ulong)(queueDepth * LargestRead));
        await container.MapAsync(eduMemory, Host.Iova);
        await using var edu = await eduSession.OpenDeviceAsync(EduAddress);
        await edu.EnableBusMasterAsync();
        await using var dma = await edu.OpenDmaChannelAsync();

        var deadline = TimeSpan.FromSeconds(options.Seconds);
        var rows = new List<BenchRow>();
        foreach (var size in new[] { 4096, LargestRead })
        {
            // A warm-up round, not counted: the JIT's later tiers and the connections' windows settle first.
            var rates = await Rounds.AlternateAsync(options, options.Quick ? 0 : 1,
                () => NvmeReadsAsync(nvme, size, deadline, verify: false),
                () => NvmeReadsAsync(nvme, size, deadline, verify: true),
                () => EduWritesAsync(dma, size, queueDepth, deadline));
            rows.Add(Row($"NVMe read {Kib(size)} KiB at QD {queueDepth} (TCP, NvmeDriver sample's path)", rates[0], rates[2]));
            rows.Add(Row($"NVMe read {Kib(size)} KiB at QD {queueDepth}, + the CPU reads the data", rates[1], rates[2]));

            BenchRow Row(string name, List<double> nvme, List<double> edu) =>
                Rounds.Row(name, nvme, $"edu DMA write {Kib(size)} KiB", edu, iops => Rounds.Format(iops * size / (1024 * 1024), 1, "MiB/s"));
        }
        return rows;
    }

    /// <summary>Reads of <paramref name="size"/> bytes cycling over the written region for <paramref name="duration"/>, at the driver's queue depth; completions per second.</summary>
    private static async Task<double> NvmeReadsAsync(NvmeBenchDriver nvme, int size, TimeSpan duration, bool verify)
    {
        var clock = Stopwatch.StartNew();
        var completed = await nvme.ReadAsync(size, duration,
            verify ? async (_, slot) => await nvme.Buffers.ReadAsync(slot, size) : (_, _) => Task.CompletedTask);
        return completed / clock.Elapsed.TotalSeconds;
    }

    /// <summary>The edu device writes <paramref name="size"/> bytes into host memory, <paramref name="inFlight"/> requests in flight, for <paramref name="duration"/>; completions per second.</summary>
    private static async Task<double> EduWritesAsync(DmaChannel dma, int size, int inFlight, TimeSpan duration)
    {
        var data = new byte[size];
        Random.Shared.NextBytes(data);
        var pending = new Queue<Task<DmaResult>>(inFlight);
        long completed = 0;
        long sent = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < duration)
        {
            if (pending.Count == inFlight)
            {
                (await pending.Dequeue()).EnsureOk();
                completed++;
            }
            pending.Enqueue(dma.WriteAsync(Host.Iova + (ulong)(sent++ % inFlight * size), data));
        }
        while (pending.Count > 0)
        {
            (await pending.Dequeue()).EnsureOk();
            completed++;
        }
        return completed / clock.Elapsed.TotalSeconds;
    }

    private static int Kib(int bytes) => bytes / 1024;
}
