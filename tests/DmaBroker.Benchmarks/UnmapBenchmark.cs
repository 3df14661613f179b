using System.Diagnostics;
using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;
using CoreSession = DmaBroker.Core.Sessions.Session;

namespace DmaBroker.Benchmarks;

/// <summary>
/// UnmapDma latency (issue 11, SPEC §4) on one IOMMUFD container with the four free edu devices
/// bound into it: map and unmap a 64 KiB range of its own, again and again (only the unmap is
/// timed), while the container is idle, while all four devices write 1 MiB at a time into another
/// range flat out over Dma.Stream (pipelined, 16 messages in flight each), and while the four
/// devices write through their handles on the broker's device engines with no gRPC (where an NVMe
/// doorbell's transfers run: the engines flat out, the devices' accesses back to back). The three loads rotate round by round. Each loaded side has
/// two rows: the UnmapDma gRPC call as the client library makes it (DMA streams on their own
/// connection, BrokerClientOptions.DmaStreamsOwnConnection), and the core's UnmapDma
/// called on a thread of its own, so the IOVA space's share and the RPC's share can be told apart.
/// The gRPC rows' baseline is a raw unary call (a server in this process that answers at once,
/// doing nothing, on a connection of its own) made right after each UnmapDma under the same load:
/// what any gRPC round trip costs while the machine carries that load, the RPC's own floor.
///   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- unmap [--rounds N] [--seconds S] [--load-size BYTES]
/// </summary>
internal sealed class UnmapBenchmark(int loadSize = 1 << 20) : IBenchSection
{
    private static readonly string[] Edus = ["0000:08:00.0", "0000:09:00.0", "0000:0a:00.0", "0000:0b:00.0"];
    private const ulong LoadIova = Host.Iova;
    private const ulong LoadSize = 1 << 20;
    private const ulong TargetIova = 0x4000_0000;
    private const ulong TargetSize = 64 * 1024;

    public string Key => "unmap";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        await using var broker = await Host.StartBrokerAsync();
        await using var rawHost = await Host.StartRawAsync();
        using var rawClient = BrokerClient.Connect(rawHost.Address);
        var rawVfio = new Vfio.VfioClient(rawClient.Raw.Channel);
        // DMA streams on a connection of their own: on the one connection an UnmapDma call waits
        // behind the streams' data in flight (p50 ~1.3 ms under this load, whatever the broker does).
        using var client = BrokerClient.Connect(broker.Address, new BrokerClientOptions { DmaStreamsOwnConnection = true });
        await using var session = await client.OpenSessionAsync("unmap-bench");
        var container = await session.CreateContainerAsync(ContainerType.Iommufd);
        var handles = new List<ulong>();
        foreach (var address in Edus)
        {
            await session.BindDeviceAsync(address, container);
            var handle = (await session.Raw.Vfio.OpenDeviceAsync(new OpenDeviceRequest { Address = address })).Handle;
            await session.Raw.Vfio.RegionWriteAsync(new RegionWriteRequest { Handle = handle, Index = 7, Offset = 4, Data = ByteString.CopyFrom(0x06, 0x00) });
            handles.Add(handle);
        }
        var loadVaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = LoadSize })).Vaddr;
        await session.Raw.Vfio.MapDmaAsync(new MapDmaRequest { ContainerId = container, Vaddr = loadVaddr, Iova = LoadIova, Size = LoadSize, Read = true, Write = true });
        var targetVaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = TargetSize })).Vaddr;
        var core = broker.Broker;
        var coreSession = core.Sessions.Find(session.Id);
        var size = (int)Math.Min((ulong)loadSize, LoadSize);
        var load = new DmaRequest { Write = new DmaWrite { Iova = LoadIova, Data = ByteString.CopyFrom(new byte[size]) } };

        var coreHandles = handles.Select(h => core.Vfio.FindHandle(coreSession, h)).ToArray();

        // Loads: none; four Dma.Streams (the gRPC path); the four devices writing on the broker's
        // device engines with no gRPC at all (as NVMe PRP transfers run), so some access is always in flight.
        string[] loads = ["idle", "gRPC", "core"];
        var grpc = new Sides(loads);
        var raw = new Sides(loads);
        var direct = new Sides(loads);
        var rates = loads.ToDictionary(l => l, _ => new List<double>());
        for (var round = 0; round < options.Rounds; round++)
        {
            // Rotate which load goes first, so a drift in the machine's load hits all alike.
            for (var k = 0; k < loads.Length; k++)
            {
                var kind = loads[(round + k) % loads.Length];
                await using var dma = kind switch
                {
                    "gRPC" => await StreamLoad.StartAsync(session, handles, load),
                    "core" => CoreLoad.Start(core.Engines, coreHandles, size),
                    _ => null,
                };
                var (unmaps, rawCalls) = await CyclesOverGrpcAsync(session.Raw.Vfio, rawVfio, container, targetVaddr, options.Seconds / 2);
                grpc.Add(kind, unmaps);
                raw.Add(kind, rawCalls);
                direct.Add(kind, await Task.Factory.StartNew(() => CyclesInCore(core, coreSession, container, targetVaddr, options.Seconds / 2), TaskCreationOptions.LongRunning));
                if (dma is not null)
                    rates[kind].Add(await dma.StopAsync());
            }
        }
        var streams = $"4 edu devices x {size / 1024} KiB writes over Dma.Stream (their own connection), 16 in flight each, {Rounds.Median(rates["gRPC"]):F0} MiB/s in all (median round)";
        var engines = $"4 edu devices x {size / 1024} KiB writes back to back on the broker's {core.Engines.Threads} device engine threads at nice {core.Engines.Nice} (no gRPC), {Rounds.Median(rates["core"]):F0} MiB/s in all (median round)";
        return
        [
            grpc.Row("UnmapDma gRPC call, 4 devices streaming DMA", "gRPC", options, streams, raw),
            direct.Row("UnmapDma core call, 4 devices streaming DMA", "gRPC", options, streams + "; the core's UnmapDma called on a thread of its own"),
            grpc.Row("UnmapDma gRPC call, 4 devices DMA on the device engines", "core", options, engines, raw),
            direct.Row("UnmapDma core call, 4 devices DMA on the device engines", "core", options, engines + "; the core's UnmapDma called on a thread of its own"),
        ];
    }

    // Map then unmap the target range over gRPC until the time is up; the unmap calls' round trips,
    // and those of a raw unary call made after each unmap.
    private static async Task<(List<double> Unmaps, List<double> Raw)> CyclesOverGrpcAsync(Vfio.VfioClient vfio, Vfio.VfioClient rawVfio, ulong container, ulong vaddr, double seconds)
    {
        var samples = new List<double>();
        var rawSamples = new List<double>();
        var rawRequest = new UnsetContainerRequest();
        var map = new MapDmaRequest { ContainerId = container, Vaddr = vaddr, Iova = TargetIova, Size = TargetSize, Read = true, Write = true };
        var unmap = new UnmapDmaRequest { ContainerId = container, Iova = TargetIova, Size = TargetSize };
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed.TotalSeconds < seconds)
        {
            await vfio.MapDmaAsync(map);
            var start = Stopwatch.GetTimestamp();
            var response = await vfio.UnmapDmaAsync(unmap);
            samples.Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds);
            if (response.Unmapped != TargetSize)
                throw new InvalidOperationException($"unmapped {response.Unmapped} bytes, not {TargetSize}");
            start = Stopwatch.GetTimestamp();
            await rawVfio.UnsetContainerAsync(rawRequest);
            rawSamples.Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds);
        }
        return (samples, rawSamples);
    }

    private static List<double> CyclesInCore(Core.Broker core, CoreSession session, ulong container, ulong vaddr, double seconds)
    {
        var samples = new List<double>();
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed.TotalSeconds < seconds)
        {
            core.Vfio.MapDma(session, container, vaddr, TargetIova, TargetSize, read: true, write: true);
            // Pacing, about one cycle a millisecond as the gRPC rows run: back to back, the cycles
            // would take a core from the four device engines and measure a lighter load. (With the
            // older reader-writer space, whose map drained every access, it also let the devices
            // come back before the unmap, so a before/after run compares like with like.)
            Thread.Sleep(1);
            var start = Stopwatch.GetTimestamp();
            var unmapped = core.Vfio.UnmapDma(session, container, TargetIova, TargetSize, all: false);
            samples.Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds);
            if (unmapped != TargetSize)
                throw new InvalidOperationException($"unmapped {unmapped} bytes, not {TargetSize}");
        }
        return samples;
    }

    // Each load's samples over all rounds, and each round's p99.
    private sealed class Sides(string[] loads)
    {
        private readonly Dictionary<string, List<double>> _samples = loads.ToDictionary(l => l, _ => new List<double>());
        private readonly Dictionary<string, List<double>> _p99 = loads.ToDictionary(l => l, _ => new List<double>());

        public void Add(string load, List<double> samples)
        {
            _samples[load].AddRange(samples);
            _p99[load].Add(Percentile(samples, 0.99));
        }

        // The row of this side's samples under <load>, against the idle container, or (given
        // <raw>) against the raw unary calls made under the same load.
        public BenchRow Row(string name, string load, BenchOptions options, string what, Sides? raw = null)
        {
            var loaded = _samples[load];
            var idle = _samples["idle"];
            var p99 = Percentile(loaded, 0.99);
            var idle99 = Percentile(idle, 0.99);
            var rounds = $"{options.Rounds} rounds, loads rotating; {loaded.Count} loaded and {idle.Count} idle unmaps of 64 KiB; p99 per round loaded {List(_p99[load])}, idle {List(_p99["idle"])}; max loaded {loaded.Max():F0} µs";
            if (raw is null)
            {
                return new BenchRow(name,
                    $"p50 {Percentile(loaded, 0.5):F1} / p99 {p99:F1} µs",
                    $"idle container p50 {Percentile(idle, 0.5):F1} / p99 {idle99:F1} µs",
                    $"p99 {p99 / idle99:F2}x",
                    $"{rounds}; {what}{Rounds.LoadAverage()}");
            }
            var floor = raw._samples[load];
            var floor99 = Percentile(floor, 0.99);
            return new BenchRow(name,
                $"p50 {Percentile(loaded, 0.5):F1} / p99 {p99:F1} µs",
                $"raw unary call, same load: p50 {Percentile(floor, 0.5):F1} / p99 {floor99:F1} µs",
                $"p99 {p99 / floor99:F2}x",
                $"{rounds}; idle container: UnmapDma p50 {Percentile(idle, 0.5):F1} / p99 {idle99:F1} µs, raw unary call p50 {Percentile(raw._samples["idle"], 0.5):F1} / p99 {Percentile(raw._samples["idle"], 0.99):F1} µs; raw unary p99 per round under this load {List(raw._p99[load])}; {what}{Rounds.LoadAverage()}");
        }

        private static string List(List<double> values) => string.Join("/", values.Select(v => v.ToString("F0", CultureInfo.InvariantCulture)));
    }

    private static double Percentile(List<double> samples, double p)
    {
        if (samples.Count == 0)
            return double.NaN;
        var sorted = samples.Order().ToList();
        return sorted[Math.Min(sorted.Count - 1, (int)(p * sorted.Count))];
    }

    /// <summary>Four Dma.Streams writing flat out (16 messages in flight each) until stopped.</summary>
    private sealed class StreamLoad : ILoad
    {
        private readonly CancellationTokenSource _stop = new();
        private readonly List<Task<long>> _streams = [];
        private readonly Stopwatch _clock = Stopwatch.StartNew();
        private readonly int _bytesPerOp;
        private bool _stopped;

        private StreamLoad(int bytesPerOp) => _bytesPerOp = bytesPerOp;

        public static async Task<ILoad> StartAsync(BrokerSession session, List<ulong> handles, DmaRequest request)
        {
            var run = new StreamLoad(request.Write.Data.Length);
            var started = handles.Select(_ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).ToArray();
            for (var i = 0; i < handles.Count; i++)
                run._streams.Add(RunAsync(session.Raw.Dma.Stream(), handles[i], request, started[i], run._stop.Token));
            // Measure only once every device has completed a write.
            await Task.WhenAll(started.Select(s => s.Task));
            return run;
        }

        /// <summary>Stops the streams and returns the MiB/s they moved together.</summary>
        public async Task<double> StopAsync()
        {
            _stopped = true;
            await _stop.CancelAsync();
            var ops = (await Task.WhenAll(_streams)).Sum();
            return ops * (double)_bytesPerOp / (1024 * 1024) / _clock.Elapsed.TotalSeconds;
        }

        private static async Task<long> RunAsync(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call, ulong handle, DmaRequest request, TaskCompletionSource started, CancellationToken stop)
        {
            using var _ = call;
            await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = handle } }, CancellationToken.None);
            const int window = 16;
            var inFlight = new SemaphoreSlim(window);
            long completed = 0;
            // Not cancelled by `stop`: what is in flight when it comes is still read to the end.
            var reader = Task.Run(async () =>
            {
                while (await call.ResponseStream.MoveNext(CancellationToken.None))
                {
                    var c = call.ResponseStream.Current.Completion;
                    if (c is null)
                        continue;
                    if (!c.Ok)
                        throw new InvalidOperationException($"DMA failed: {c}");
                    completed++;
                    started.TrySetResult();
                    inFlight.Release();
                }
            }, CancellationToken.None);
            try
            {
                while (!stop.IsCancellationRequested)
                {
                    await inFlight.WaitAsync(stop);
                    await call.RequestStream.WriteAsync(request, CancellationToken.None);
                }
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested)
            {
                // Stopped: what is in flight completes below.
            }
            await call.RequestStream.CompleteAsync();
            await reader;
            return completed;
        }

        public async ValueTask DisposeAsync()
        {
            if (!_stopped)
                await StopAsync();
            _stop.Dispose();
        }
    }

    private interface ILoad : IAsyncDisposable
    {
        /// <summary>Stops the load and returns the MiB/s it moved.</summary>
        Task<double> StopAsync();
    }

    /// <summary>
    /// Four devices, each writing <c>size</c> bytes through its handle in the core, back to back
    /// until stopped, on the broker's device engines (<see cref="Core.Devices.DeviceEngines"/>),
    /// where an NVMe doorbell's commands and their transfers run.
    /// </summary>
    private sealed class CoreLoad : ILoad
    {
        private readonly Stopwatch _clock = Stopwatch.StartNew();
        private readonly Task<long>[] _devices;
        private readonly int _size;
        private volatile bool _stop;

        private CoreLoad(Core.Devices.DeviceEngines engines, Core.Vfio.DeviceHandle[] handles, int size)
        {
            _size = size;
            _devices = [.. handles.Select(h => RunAsync(engines, h))];
        }

        public static CoreLoad Start(Core.Devices.DeviceEngines engines, Core.Vfio.DeviceHandle[] handles, int size) => new(engines, handles, size);

        private async Task<long> RunAsync(Core.Devices.DeviceEngines engines, Core.Vfio.DeviceHandle handle)
        {
            var data = new byte[_size];
            long ops = 0;
            while (!_stop)
            {
                if (!(await engines.RunAsync(() => handle.DmaWrite(LoadIova, data))).Ok)
                    throw new InvalidOperationException("a load write faulted");
                ops++;
            }
            return ops;
        }

        public async Task<double> StopAsync()
        {
            _stop = true;
            var ops = (await Task.WhenAll(_devices)).Sum();
            return ops * (double)_size / (1024 * 1024) / _clock.Elapsed.TotalSeconds;
        }

        public async ValueTask DisposeAsync()
        {
            if (!_stop)
                await StopAsync();
        }
    }
}
