using System.Diagnostics;
using System.Globalization;
using System.Numerics;
using System.Runtime.InteropServices;
using DmaBroker.Client;
using DmaBroker.Samples.Nvme;

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
internal sealed class NvmeLocalBenchmark : IBenchSection
{
    private const string NvmeAddress = "0000:01:00.0";
    private const int ReadSize = 128 * 1024;
    private const int QueueDepth = 32;
    /// <summary>The range the reads cycle over (of the 64 MiB namespace), larger than the last-level cache.</summary>
    private const int RegionBytes = 16 * 1024 * 1024;
    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(10);

    public string Key => "nvme-local";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var directory = Directory.CreateTempSubdirectory("dmabroker-bench-").FullName;
        var socket = Path.Combine(directory, "broker.sock");
        try
        {
            await using var tcpBroker = await Host.StartBrokerAsync();
            await using var localBroker = await Host.StartBrokerAsync($"unix://{socket}");
            await using var tcp = await Driver.StartAsync(tcpBroker.Address, shared: false);
            await using var local = await Driver.StartAsync($"unix://{socket}", shared: true);
            var memcpy = new Memcpy();
            var sides = new (string Name, Func<TimeSpan, Task<double>> Measure, List<double> Rates)[]
            {
                ("local", local.ReadAsync, []),
                ("TCP", tcp.ReadAsync, []),
                ("memcpy", d => Task.FromResult(memcpy.Run(d)), []),
            };
            var duration = TimeSpan.FromSeconds(options.Seconds);
            Console.WriteLine($"nvme-local: NVMe {ReadSize / 1024} KiB reads at QD {QueueDepth}, local shared-memory path vs TCP path vs memcpy: {options.Rounds} rounds x {options.Seconds:F1} s per side, alternating, {Environment.ProcessorCount} cores{Rounds.LoadAverage()}");
            for (var round = -1; round < options.Rounds; round++)
            {
                foreach (var (_, measure, rates) in sides)
                {
                    var bytesPerSecond = await measure(duration);
                    if (round >= 0)
                        rates.Add(bytesPerSecond / (1024 * 1024));
                }
            }
            var (localRate, tcpRate, memcpyRate) = (Rounds.Median(sides[0].Rates), Rounds.Median(sides[1].Rates), Rounds.Median(sides[2].Rates));
            var baseline = $"memcpy of the same bytes {memcpyRate:F0} MiB/s";
            string Detail(int side) => $"median of {options.Rounds}: {string.Join(", ", sides[side].Rates.Select(r => r.ToString("F0", CultureInfo.InvariantCulture)))} MiB/s";
            return
            [
                new($"NVMe {ReadSize / 1024} KiB reads at QD {QueueDepth}, local shared-memory path", $"{localRate:F0} MiB/s", baseline, $"{localRate / memcpyRate:P0}", Detail(0)),
                new($"NVMe {ReadSize / 1024} KiB reads at QD {QueueDepth}, TCP path", $"{tcpRate:F0} MiB/s", baseline, $"{tcpRate / memcpyRate:P0}", Detail(1)),
                new("  local path / TCP path", $"{Rounds.Median(sides[0].Rates.Zip(sides[1].Rates, (l, t) => l / t)):F1}x", $"TCP path {tcpRate:F0} MiB/s", "", "median of the rounds' ratios; memcpy: " + Detail(2)),
            ];
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
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

    /// <summary>The NvmeDriver sample's controller, one I/O queue pair and its buffers, on one broker, with the region written once.</summary>
    private sealed class Driver : IAsyncDisposable
    {
        private readonly BrokerClient _client;
        private readonly VfioBinding _vfio;
        private readonly NvmeController _controller;
        private readonly NvmeQueuePair _queue;
        private readonly NvmeIoBuffers _buffers;
        private readonly int _blocks;
        private readonly int _blockSize;
        private ulong _consumed;

        private Driver(BrokerClient client, VfioBinding vfio, NvmeController controller, NvmeQueuePair queue, NvmeIoBuffers buffers, int blockSize)
        {
            (_client, _vfio, _controller, _queue, _buffers, _blockSize) = (client, vfio, controller, queue, buffers, blockSize);
            _blocks = ReadSize / blockSize;
        }

        public static async Task<Driver> StartAsync(string address, bool shared)
        {
            var client = BrokerClient.Connect(address);
            var vfio = await VfioBinding.OpenAsync(client, NvmeAddress, "nvme", shared ? "bench-nvme-local" : "bench-nvme-tcp", _ => { });
            var controller = await NvmeController.StartAsync(vfio, _ => { }, shared);
            var id = await controller.IdentifyAsync();
            await controller.SetNumberOfQueuesAsync(1);
            var queue = await controller.CreateIoQueuePairAsync(qid: 1, entries: QueueDepth + 1, vector: 1);
            var buffers = await controller.MapIoBuffersAsync(QueueDepth, ReadSize);
            var blocks = ReadSize / id.BlockSize;
            // Written once, so the reads return data that was written rather than never-written zeros.
            await queue.RunAsync(RegionBytes / ReadSize, QueueDepth,
                (i, slot) => Task.FromResult(buffers.Command(NvmeCommand.IoWrite, slot, (ulong)(i * blocks), blocks, id.BlockSize)),
                (_, _) => Task.CompletedTask, CommandTimeout);
            return new Driver(client, vfio, controller, queue, buffers, id.BlockSize);
        }

        /// <summary>Reads cycling over the region for <paramref name="duration"/>, consuming each one's data; bytes per second.</summary>
        public async Task<double> ReadAsync(TimeSpan duration)
        {
            var regionBlocks = RegionBytes / _blockSize;
            using var stop = new CancellationTokenSource(duration);
            var clock = Stopwatch.StartNew();
            var completed = await _queue.RunAsync(long.MaxValue, QueueDepth,
                (i, slot) => Task.FromResult(_buffers.Command(NvmeCommand.IoRead, slot, (ulong)(i * _blocks % regionBlocks), _blocks, _blockSize)),
                _buffers.IsShared
                    ? (_, slot) =>
                    {
                        _consumed ^= Consume(_buffers.Slot(slot, ReadSize).Span);
                        return Task.CompletedTask;
                    }
                    : async (_, slot) => _consumed ^= Consume(await _buffers.ReadAsync(slot, ReadSize)),
                CommandTimeout, stop.Token);
            return completed * (double)ReadSize / clock.Elapsed.TotalSeconds;
        }

        public async ValueTask DisposeAsync()
        {
            await _controller.DeleteIoQueuePairAsync(_queue);
            await _controller.ShutdownAsync();
            await _controller.ReleaseAsync();
            await _vfio.CloseAsync();
            await _controller.DisposeAsync();
            await _vfio.DisposeAsync();
            _client.Dispose();
            GC.KeepAlive(_consumed);
        }
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
