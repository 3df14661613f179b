using System.Diagnostics;
using System.Numerics;
using System.Runtime.InteropServices;
using DmaBroker.Client;

namespace DmaBroker.Benchmarks;

/// <summary>
/// SPEC §15's local fast path against the TCP path: NVMe reads of 128 KiB at queue depth 32,
/// driven by the NvmeDriver sample's own classes, where the driver consumes every byte it read.
/// The TCP side is the sample as a remote client runs it (queues, completions and data through
/// Memory.Read/Write calls); the local side runs it with <c>--shared</c> over a Unix socket (queues,
/// completions and data read as plain shared memory). Both sides do the same work on the data (a
/// vectorised XOR over it), and beside them a plain memcpy of the same bytes (128 KiB blocks from a
/// 16 MiB region into 32 slots, then the same XOR) shows what the machine's memory allows. Each
/// side has its own in-process broker with one NVMe controller; the sides alternate, one round
/// each in turn, after a warm-up round.
/// </summary>
internal sealed class NvmeLocalSection : IBenchSection
{
    private const string NvmeAddress = "0000:01:00.0";
    private const int ReadSize = 128 * 1024;
    private const int QueueDepth = 32;
    /// <summary>The range the reads cycle over (of the 64 MiB namespace), larger than the last-level cache.</summary>
    private const int RegionBytes = 16 * 1024 * 1024;

    public string Key => "nvme-local";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var directory = Directory.CreateTempSubdirectory("dmabroker-bench-").FullName;
        var socket = Path.Combine(directory, "broker.sock");
        try
        {
            await using var tcpBroker = await Host.StartBrokerAsync();
            await using var localBroker = await Host.StartBrokerAsync($"unix://{socket}");
            using var tcpClient = BrokerClient.Connect(tcpBroker.Address);
            using var localClient = BrokerClient.Connect($"unix://{socket}");
            await using var tcp = await NvmeBenchDriver.StartAsync(tcpClient, "bench-nvme-tcp", QueueDepth, ReadSize, RegionBytes, shared: false);
            await using var local = await NvmeBenchDriver.StartAsync(localClient, "bench-nvme-local", QueueDepth, ReadSize, RegionBytes, shared: true);
            var memcpy = new Memcpy();
            var duration = TimeSpan.FromSeconds(options.Seconds);
            // A warm-up round, not counted: the JIT's later tiers and the connections' windows settle first.
            var rates = await Rounds.AlternateAsync(options, options.Quick ? 0 : 1,
                () => ReadAsync(local, duration),
                () => ReadAsync(tcp, duration),
                () => Task.FromResult(memcpy.Run(duration)));
            static string MiBs(double bytesPerSecond) => Rounds.Format(bytesPerSecond / (1024 * 1024), 0, "MiB/s");
            // Per interrupt the driver gets one session event; MMIO doorbells (CQ head, SQ tail) go on the DMA stream, with
            // shadow doorbells (the local path) only when the controller's EventIdx asks for one.
            static string PerInterrupt(NvmeBenchDriver driver) =>
                $", {Rounds.Median(driver.CommandsPerInterrupt):F1} commands per interrupt taken, {Rounds.Median(driver.DoorbellsPerCommand):F3} MMIO doorbells per command";
            const string baseline = "memcpy of the same bytes";
            return
            [
                Rounds.Row($"NVMe read {ReadSize / 1024} KiB at QD {QueueDepth}, local shared-memory path (unix://)", rates[0], baseline, rates[2], MiBs, PerInterrupt(local)),
                Rounds.Row($"NVMe read {ReadSize / 1024} KiB at QD {QueueDepth}, TCP path, the same driver", rates[1], baseline, rates[2], MiBs, PerInterrupt(tcp)),
                Rounds.Row($"NVMe read {ReadSize / 1024} KiB at QD {QueueDepth}, local path vs TCP path", rates[0], "TCP path", rates[1], MiBs),
            ];
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>Reads cycling over the region for <paramref name="duration"/>, consuming each one's data; bytes per second.</summary>
    private static async Task<double> ReadAsync(NvmeBenchDriver driver, TimeSpan duration)
    {
        var buffers = driver.Buffers;
        var interrupts = driver.Queue.InterruptsTaken;
        var doorbells = driver.Queue.DoorbellsRung;
        ulong consumed = 0;
        var clock = Stopwatch.StartNew();
        var completed = await driver.ReadAsync(ReadSize, duration, buffers.IsShared
            ? (_, slot) =>
            {
                consumed ^= Consume(buffers.Slot(slot, ReadSize).Span);
                return Task.CompletedTask;
            }
            : async (_, slot) => consumed ^= Consume(await buffers.ReadAsync(slot, ReadSize)));
        GC.KeepAlive(consumed);
        var seconds = clock.Elapsed.TotalSeconds;
        driver.CommandsPerInterrupt.Add(completed / (double)Math.Max(1, driver.Queue.InterruptsTaken - interrupts));
        driver.DoorbellsPerCommand.Add((driver.Queue.DoorbellsRung - doorbells) / (double)Math.Max(1, completed));
        return completed * (double)ReadSize / seconds;
    }

    /// <summary>What the driver does with the data it read: reads every byte (a vectorised XOR), so neither side can skip it.</summary>
    private static ulong Consume(ReadOnlySpan<byte> data)
    {
        var words = MemoryMarshal.Cast<byte, Vector<ulong>>(data);
        var sum = Vector<ulong>.Zero;
        foreach (var word in words)
            sum ^= word;
        return Vector.Dot(sum, Vector<ulong>.One);
    }

    /// <summary>The baseline: the same bytes copied by the CPU, 128 KiB at a time from a 16 MiB region into 32 slots, and consumed as the drivers consume theirs.</summary>
    private sealed class Memcpy
    {
        private readonly byte[] _region = new byte[RegionBytes];
        private readonly byte[] _slots = new byte[QueueDepth * ReadSize];
        private ulong _consumed;

        public Memcpy() => Random.Shared.NextBytes(_region);

        public double Run(TimeSpan duration)
        {
            var clock = Stopwatch.StartNew();
            long copies = 0;
            while (clock.Elapsed < duration)
            {
                // A batch between clock reads, so reading the clock costs nothing that matters.
                for (var i = 0; i < QueueDepth; i++, copies++)
                {
                    var slot = _slots.AsSpan(i * ReadSize, ReadSize);
                    _region.AsSpan((int)(copies * ReadSize % RegionBytes), ReadSize).CopyTo(slot);
                    _consumed ^= Consume(slot);
                }
            }
            GC.KeepAlive(_consumed);
            return copies * (double)ReadSize / clock.Elapsed.TotalSeconds;
        }
    }
}
