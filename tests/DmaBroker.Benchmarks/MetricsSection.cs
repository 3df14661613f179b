using System.Diagnostics.Metrics;
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
internal sealed class MetricsSection : IBenchSection
{
    private const int WarmupRounds = 2;

    public string Key => "metrics";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var warmup = options.Quick ? 0 : WarmupRounds;
        await using var on = await Host.StartBrokerAsync("http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0");
        await using var off = await Host.StartBrokerAsync(services => services.ConfigureOpenTelemetryMeterProvider(metrics =>
            metrics.AddView(instrument => instrument.Meter.Name == BrokerMetrics.MeterName ? MetricStreamConfiguration.Drop : null)),
            "http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0");
        var sides = new[] { await Side.StartAsync(on), await Side.StartAsync(off) };
        try
        {
            if (!IsListened(on) || IsListened(off))
                throw new InvalidOperationException("the 'on' broker's DMA counters are not collected, or the 'off' broker's are");
            var rows = new List<BenchRow>();
            // 1 MiB writes tell nothing 64 KiB ones do not: the counters are per operation.
            foreach (var scenario in DmaLoad.Scenarios.Where(s => s.BytesPerOp != 1024 * 1024))
            {
                var requests = scenario.Requests();
                var rates = await Rounds.AlternateAsync(options, warmup,
                    [.. sides.Select(side => (Func<Task<double>>)(() => DmaLoad.MeasureAsync(side.Session.Raw.Dma.Stream(), side.Handle, requests, scenario.OpsPerMessage, options.Seconds)))]);
                rows.Add(Rounds.Row($"{scenario.Name}, metrics on (OTel + Prometheus reader)", rates[0], "DmaBroker meter dropped", rates[1],
                    r => Rounds.Format(scenario.Scale(r), scenario.Unit == "MiB/s" ? 0 : 2, scenario.Unit)));
            }
            var scrape = await new HttpClient().GetStringAsync(on.WebAddress + "/metrics");
            if (!scrape.Contains("dmabroker_dma_bytes", StringComparison.Ordinal))
                throw new InvalidOperationException("the 'on' broker's /metrics has no dmabroker_dma_bytes");
            rows.Add(await CoreAsync(options, warmup));
            return rows;
        }
        finally
        {
            foreach (var side in sides)
                await side.DisposeAsync();
        }
    }

    /// <summary>The core alone: 64-byte device writes, back to back on one thread, with the meter collected by an OpenTelemetry SDK reader or not listened to.</summary>
    private static async Task<BenchRow> CoreAsync(BenchOptions options, int warmup)
    {
        // In-process sessions send no pings: a lease longer than the run keeps them.
        var brokerOptions = new BrokerOptions { Sessions = new Core.Sessions.SessionOptions { LeaseTtl = TimeSpan.FromHours(1) } };
        await using var on = new Broker(TopologyDocument.Default(), brokerOptions);
        await using var off = new Broker(TopologyDocument.Default(), brokerOptions);
        // Both meters are named DmaBroker: the reader takes only the 'on' broker's.
        using var provider = OpenTelemetry.Sdk.CreateMeterProviderBuilder()
            .AddMeter(BrokerMetrics.MeterName)
            .AddView(instrument => instrument.Meter == on.Metrics.Meter ? null : MetricStreamConfiguration.Drop)
            .AddReader(new PeriodicExportingMetricReader(new DiscardingExporter(), 1000))
            .Build();
        var data = new byte[64];
        var rates = await Rounds.AlternateAsync(options, warmup, [.. new[] { OpenEdu(on), OpenEdu(off) }.Select(handle => (Func<Task<double>>)(() =>
        {
            long done = 0;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (clock.Elapsed.TotalSeconds < options.Seconds)
            {
                for (var n = 0; n < 1024; n++)
                    handle.DmaWrite(Host.Iova + (ulong)(n % 256) * 64, data);
                done += 1024;
            }
            return Task.FromResult(done / clock.Elapsed.TotalSeconds);
        }))]);
        // Rates in, ns per write out: the ratio is of times, so on / off above 100 % is the cost.
        var nsOn = rates[0].Select(r => 1e9 / r).ToList();
        var nsOff = rates[1].Select(r => 1e9 / r).ToList();
        return Rounds.Row("core: 64-byte device write (one thread, no gRPC), metrics on (OTel SDK reader)", nsOn, "meter not listened to", nsOff,
            ns => Rounds.Format(ns, 1, "ns/op"));
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
    private sealed class Side(BrokerClient client, BrokerSession session, ulong handle) : IAsyncDisposable
    {
        public BrokerSession Session { get; } = session;
        public ulong Handle { get; } = handle;

        public static async Task<Side> StartAsync(Host host)
        {
            var client = BrokerClient.Connect(host.Address);
            var session = await client.OpenSessionAsync("metrics-bench");
            return new Side(client, session, await Host.PrepareDeviceAsync(session));
        }

        public async ValueTask DisposeAsync()
        {
            await Session.DisposeAsync();
            client.Dispose();
        }
    }
}
