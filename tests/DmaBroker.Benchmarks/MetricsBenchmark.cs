using System.Diagnostics.Metrics;
using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Core;
using DmaBroker.Core.Telemetry;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using OpenTelemetry.Metrics;

namespace DmaBroker.Benchmarks;

/// <summary>
/// What collecting the DmaBroker meter costs the DMA hot path, side by side in one run. First
/// end to end: the same Dma.Stream load on two in-process brokers, both exporting their metrics
/// as a broker does by default (OpenTelemetry with the Prometheus reader on the web listener), one
/// of them with the DmaBroker meter dropped, so nothing listens to its instruments and each record
/// is one check of an empty subscription list. Then the core alone, without gRPC: 64-byte device
/// writes on two brokers, one whose meter an OpenTelemetry SDK reader collects. Rounds alternate
/// the two sides, rotating which goes first, after warm-up rounds; each side's median round is
/// reported, with the on/off ratio of the medians and the median of the rounds' own ratios.
/// </summary>
internal static class MetricsBenchmark
{
    private const int WarmupRounds = 2;

    public static async Task RunAsync(int rounds, double seconds)
    {
        await using var on = await Host.StartBrokerAsync("http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0");
        await using var off = await Host.StartBrokerAsync(services => services.ConfigureOpenTelemetryMeterProvider(metrics =>
            metrics.AddView(instrument => instrument.Meter.Name == BrokerMetrics.MeterName ? MetricStreamConfiguration.Drop : null)),
            "http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0");
        var sides = new[] { await Side.StartAsync("metrics on (OTel + Prometheus reader)", on), await Side.StartAsync("metrics off (DmaBroker meter dropped)", off) };
        try
        {
            Console.WriteLine($"DmaBroker metrics benchmark: {rounds} rounds x {seconds:F1} s per side, sides interleaved, {WarmupRounds} warm-up rounds, loopback, {Environment.ProcessorCount} cores{Rounds.LoadAverage()}");
            foreach (var side in sides)
                Console.WriteLine($"  {side.Name}: dmabroker.dma.bytes collected: {(IsListened(side.Host) ? "yes" : "no")}");
            foreach (var scenario in DmaLoad.Scenarios)
            {
                var requests = scenario.Requests();
                var rates = sides.ToDictionary(s => s, _ => new List<double>());
                for (var round = -WarmupRounds; round < rounds; round++)
                {
                    for (var i = 0; i < sides.Length; i++)
                    {
                        var side = sides[(round + WarmupRounds + i) % sides.Length];
                        var rate = await DmaLoad.MeasureAsync(side.Session.Raw.Dma.Stream(), side.Handle, requests, scenario.OpsPerMessage, seconds);
                        if (round >= 0)
                            rates[side].Add(rate);
                    }
                }
                Console.WriteLine($"{scenario.Name}:");
                foreach (var side in sides)
                {
                    var all = string.Join(", ", rates[side].Select(r => scenario.Scale(r).ToString("F2", CultureInfo.InvariantCulture)));
                    Console.WriteLine($"  {side.Name,-40} {scenario.Scale(Rounds.Median(rates[side])),10:F2} {scenario.Unit}   (median of {rounds}; {all})");
                }
                Ratio(rates[sides[0]], rates[sides[1]]);
            }
            var scrape = await new HttpClient().GetStringAsync(on.WebAddress + "/metrics");
            Console.WriteLine($"the 'on' broker's /metrics counted: {string.Join("; ", scrape.Split('\n').Where(l => l.StartsWith("dmabroker_dma_", StringComparison.Ordinal)))}");
            await CoreAsync(rounds, seconds);
            Console.WriteLine($"(end{Rounds.LoadAverage()})");
        }
        finally
        {
            foreach (var side in sides)
                await side.DisposeAsync();
        }
    }

    private static void Ratio(List<double> on, List<double> off)
    {
        var paired = Rounds.Median(on.Zip(off, (a, b) => a / b));
        Console.WriteLine($"  on / off {Rounds.Median(on) / Rounds.Median(off),41:P1}   (paired rounds: {paired:P1})");
    }

    /// <summary>The core alone: 64-byte device writes, back to back on one thread, with the meter collected by an OpenTelemetry SDK reader or not listened to.</summary>
    private static async Task CoreAsync(int rounds, double seconds)
    {
        // In-process sessions send no pings: a lease longer than the run keeps them.
        var options = new BrokerOptions { Sessions = new Core.Sessions.SessionOptions { LeaseTtl = TimeSpan.FromHours(1) } };
        await using var on = new Broker(TopologyDocument.Default(), options);
        await using var off = new Broker(TopologyDocument.Default(), options);
        // Both meters are named DmaBroker: the reader takes only the 'on' broker's.
        using var provider = OpenTelemetry.Sdk.CreateMeterProviderBuilder()
            .AddMeter(BrokerMetrics.MeterName)
            .AddView(instrument => instrument.Meter == on.Metrics.Meter ? null : MetricStreamConfiguration.Drop)
            .AddReader(new PeriodicExportingMetricReader(new DiscardingExporter(), 1000))
            .Build();
        var handles = new[] { OpenEdu(on), OpenEdu(off) };
        var rates = new[] { new List<double>(), new List<double>() };
        var data = new byte[64];
        for (var round = -WarmupRounds; round < rounds; round++)
        {
            for (var i = 0; i < 2; i++)
            {
                var side = (round + WarmupRounds + i) % 2;
                var handle = handles[side];
                long done = 0;
                var clock = System.Diagnostics.Stopwatch.StartNew();
                while (clock.Elapsed.TotalSeconds < seconds)
                {
                    for (var n = 0; n < 1024; n++)
                        handle.DmaWrite(Host.Iova + (ulong)(n % 256) * 64, data);
                    done += 1024;
                }
                if (round >= 0)
                    rates[side].Add(done / clock.Elapsed.TotalSeconds);
            }
        }
        Console.WriteLine("core alone, 64-byte device writes (no gRPC, one thread):");
        Console.WriteLine($"  metrics on (OTel SDK reader)             {1e9 / Rounds.Median(rates[0]),10:F1} ns/op");
        Console.WriteLine($"  metrics off (meter not listened to)      {1e9 / Rounds.Median(rates[1]),10:F1} ns/op");
        Ratio(rates[0], rates[1]);
    }

    private static DeviceHandle OpenEdu(Broker broker)
    {
        var session = broker.Sessions.Open("metrics-bench");
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        broker.Vfio.SetContainer(session, 14, container.Id);
        var block = session.Allocate(1 << 20);
        broker.Vfio.MapDma(session, container.Id, block.Vaddr, Host.Iova, 1 << 20, read: true, write: true);
        var handle = broker.Vfio.OpenDevice(session, PciAddress.Parse("0000:08:00.0"));
        handle.MmioWrite(7, 4, 2, 0x6);
        return handle;
    }

    /// <summary>A reader's exporter that drops what it is given: the cost measured is the aggregation.</summary>
    private sealed class DiscardingExporter : OpenTelemetry.BaseExporter<Metric>
    {
        public override OpenTelemetry.ExportResult Export(in OpenTelemetry.Batch<Metric> batch) => OpenTelemetry.ExportResult.Success;
    }

    /// <summary>Whether anything (OpenTelemetry's reader) listens to the broker's DMA byte counter.</summary>
    private static bool IsListened(Host host)
    {
        var listened = false;
        using var probe = new MeterListener
        {
            InstrumentPublished = (instrument, _) =>
            {
                if (instrument.Meter == host.Broker.Metrics.Meter && instrument.Name == "dmabroker.dma.bytes")
                    listened = instrument.Enabled;
            },
        };
        probe.Start();
        return listened;
    }

    /// <summary>One broker with a client, a session and an open edu device with 1 MiB mapped.</summary>
    private sealed class Side(string name, Host host, BrokerClient client, BrokerSession session, ulong handle) : IAsyncDisposable
    {
        public string Name { get; } = name;
        public Host Host { get; } = host;
        public BrokerSession Session { get; } = session;
        public ulong Handle { get; } = handle;

        public static async Task<Side> StartAsync(string name, Host host)
        {
            var client = BrokerClient.Connect(host.Address);
            var session = await client.OpenSessionAsync("metrics-bench");
            return new Side(name, host, client, session, await Host.PrepareDeviceAsync(session));
        }

        public async ValueTask DisposeAsync()
        {
            await Session.DisposeAsync();
            client.Dispose();
        }
    }
}
