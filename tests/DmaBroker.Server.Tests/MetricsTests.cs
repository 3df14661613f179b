using System.Net;
using System.Net.Http.Headers;
using System.Text;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §13 metrics end to end: the broker's instruments scraped as Prometheus text from
/// <c>GET /metrics</c> on the web listener while sessions claim groups and devices move bytes,
/// each value checked against exactly what happened; and OTLP export when it is configured.
/// </summary>
public sealed class MetricsTests
{
    private const uint Group = 14;
    private const string Edu = "0000:08:00.0";
    private const string Nvme = "0000:01:00.0";
    private const ulong Iova = 0x10_0000;

    /// <summary>GET /metrics on <paramref name="webAddress"/>: 200 with Prometheus text, parsed.</summary>
    public static async Task<PrometheusText> ScrapeAsync(string webAddress, string? bearer = null)
    {
        using var response = await GetAsync(webAddress + BrokerTelemetry.ScrapePath, bearer);
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.OK, $"{(int)response.StatusCode}: {body}");
        Assert.Equal("text/plain", response.Content.Headers.ContentType?.MediaType);
        return PrometheusText.Parse(body);
    }

    /// <summary>An HTTP/1.1 GET, as curl and Prometheus make it, with an optional bearer token.</summary>
    public static async Task<HttpResponseMessage> GetAsync(string url, string? bearer = null, Version? version = null)
    {
        using var http = new HttpClient { Timeout = TestBroker.Timeout };
        using var request = new HttpRequestMessage(HttpMethod.Get, url)
        {
            Version = version ?? HttpVersion.Version11,
            VersionPolicy = HttpVersionPolicy.RequestVersionExact,
        };
        if (bearer is not null)
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", bearer);
        return await http.SendAsync(request);
    }

    [Fact]
    public async Task Scrape_SessionClaimsAndEnds_SessionsGroupsClaimsAndReleaseMoveByOne()
    {
        await using var broker = await TestBroker.StartAsync();
        var web = broker.WebAddress;
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();
        var nvmeGroup = (await broker.Client.ListDevicesAsync()).Devices.Single(d => d.Address == Nvme).GroupId;
        var before = await ScrapeAsync(web);

        var session = await broker.Client.OpenSessionAsync("metrics");
        var open = await ScrapeAsync(web);
        Assert.Equal(before.Value("dmabroker_sessions") + 1, open.Value("dmabroker_sessions"));

        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(Group);
        await Expect(Errno.EPERM, Grpc.Core.StatusCode.PermissionDenied, () => container.SetGroupAsync(nvmeGroup));
        var claimed = await ScrapeAsync(web);
        Assert.Equal(before.Value("dmabroker_groups_owned", ("owner_kind", "user")) + 1, claimed.Value("dmabroker_groups_owned", ("owner_kind", "user")));
        Assert.Equal(before.Value("dmabroker_groups_owned", ("owner_kind", "none")) - 1, claimed.Value("dmabroker_groups_owned", ("owner_kind", "none")));
        Assert.Equal(before.Value("dmabroker_groups_owned", ("owner_kind", "kernel")), claimed.Value("dmabroker_groups_owned", ("owner_kind", "kernel")));
        Assert.Equal(before.ValueOrZero("dmabroker_claims_total", ("result", "ok")) + 1, claimed.Value("dmabroker_claims_total", ("result", "ok")));
        Assert.Equal(before.ValueOrZero("dmabroker_claims_total", ("result", "eperm")) + 1, claimed.Value("dmabroker_claims_total", ("result", "eperm")));
        Assert.Equal("counter", claimed.Types["dmabroker_claims_total"]);

        var id = session.Id;
        await session.DisposeAsync();
        // The release is counted before the watch tells of the session's end.
        while ((await watcher.NextAsync()).SessionEnded is not { } ended || ended.SessionId != id)
        {
        }
        var after = await ScrapeAsync(web);
        Assert.Equal(before.Value("dmabroker_sessions"), after.Value("dmabroker_sessions"));
        Assert.Equal(before.Value("dmabroker_groups_owned", ("owner_kind", "user")), after.Value("dmabroker_groups_owned", ("owner_kind", "user")));
        const string Release = "dmabroker_session_release_duration_seconds";
        Assert.Equal("histogram", after.Types[Release]);
        Assert.Equal(before.ValueOrZero(Release + "_count", ("reason", "client_closed")) + 1, after.Value(Release + "_count", ("reason", "client_closed")));
        Assert.Equal(after.Value(Release + "_count", ("reason", "client_closed")), after.Value(Release + "_bucket", ("reason", "client_closed"), ("le", "+Inf")));
        Assert.InRange(after.Value(Release + "_sum", ("reason", "client_closed")), 0, TestBroker.Timeout.TotalSeconds);
    }

    [Fact]
    public async Task Scrape_DmaRun_BytesAndOperationsByDirectionMoveByExactlyWhatMoved_FaultByReason()
    {
        await using var broker = await TestBroker.StartAsync();
        var web = broker.WebAddress;
        await using var session = await broker.Client.OpenSessionAsync("dma");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(Group);
        var buffer = await session.AllocateAsync(0x10000);
        await container.MapAsync(buffer, Iova);
        await using var device = await session.OpenDeviceAsync(Edu);
        await device.EnableBusMasterAsync();
        await using var dma = await device.OpenDmaChannelAsync();
        var before = await ScrapeAsync(web);

        (await dma.WriteAsync(Iova, new byte[6000])).EnsureOk();
        (await dma.ReadAsync(Iova + 0x2000, 5000)).EnsureOk();
        // The copy engine reads its source and writes its destination: 3000 bytes each way.
        (await dma.CopyAsync(Iova, Iova + 0x8000, 3000)).EnsureOk();
        var fault = await dma.WriteAsync(0x9000_0000, new byte[100]);
        Assert.Equal(FaultReason.Unmapped, fault.Fault?.Reason);
        var after = await ScrapeAsync(web);

        double Delta(string name, params (string, string)[] labels) => after.Value(name, labels) - before.ValueOrZero(name, labels);
        Assert.Equal(6000 + 3000, Delta("dmabroker_dma_bytes_total", ("direction", "write")));
        Assert.Equal(5000 + 3000, Delta("dmabroker_dma_bytes_total", ("direction", "read")));
        Assert.Equal(2, Delta("dmabroker_dma_operations_total", ("direction", "write")));
        Assert.Equal(2, Delta("dmabroker_dma_operations_total", ("direction", "read")));
        Assert.Equal(1, Delta("dmabroker_dma_faults_total", ("reason", "unmapped")));
        Assert.Equal(0, after.ValueOrZero("dmabroker_dma_faults_total", ("reason", "permission")));
    }

    [Fact]
    public async Task Scrape_WatchOpen_WatchersUpByOne()
    {
        await using var broker = await TestBroker.StartAsync();
        var before = await ScrapeAsync(broker.WebAddress);

        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();

        Assert.Equal(before.Value("dmabroker_watchers") + 1, (await ScrapeAsync(broker.WebAddress)).Value("dmabroker_watchers"));
    }

    [Fact]
    public async Task Scrape_TwoBrokersInOneProcess_EachCountsOnlyItsOwn()
    {
        await using var busy = await TestBroker.StartAsync();
        await using var idle = await TestBroker.StartAsync();
        await using var first = await busy.Client.OpenSessionAsync("one");
        await using var second = await busy.Client.OpenSessionAsync("two");
        await (await first.NewContainerAsync(ContainerType.Type1V2)).SetGroupAsync(Group);

        var idleScrape = await ScrapeAsync(idle.WebAddress);
        var busyScrape = await ScrapeAsync(busy.WebAddress);

        Assert.Equal(0, idleScrape.Value("dmabroker_sessions"));
        Assert.Equal(0, idleScrape.Value("dmabroker_groups_owned", ("owner_kind", "user")));
        Assert.Equal(0, idleScrape.ValueOrZero("dmabroker_claims_total", ("result", "ok")));
        Assert.Equal(2, busyScrape.Value("dmabroker_sessions"));
        Assert.Equal(1, busyScrape.Value("dmabroker_claims_total", ("result", "ok")));
    }

    [Fact]
    public async Task Scrape_BrokerWithoutAHostEndsInTheSameProcess_HostKeepsExportingItsOwnCounts()
    {
        await using var host = await TestBroker.StartAsync();
        // A broker built with no IMeterFactory, as ThinServiceTests and embedders do: its meter
        // has the same name and instruments as the host's, and no factory scope.
        var standalone = new Core.Broker(Core.Topology.TopologyDocument.Default());
        standalone.Sessions.Open();
        standalone.Sessions.Open();

        var beside = await ScrapeAsync(host.WebAddress);
        await standalone.DisposeAsync();
        // The first collect after its meter is disposed exports a stream it ended one last time; the second shows whether the host's own stream survived.
        var after = await ScrapeAsync(host.WebAddress);
        var later = await ScrapeAsync(host.WebAddress);

        Assert.Equal(0, beside.Value("dmabroker_sessions"));
        Assert.Equal(0, after.Value("dmabroker_sessions"));
        Assert.Equal(0, later.Value("dmabroker_sessions"));
        Assert.Equal(0, later.Value("dmabroker_watchers"));
        Assert.Equal(0, later.Value("dmabroker_groups_owned", ("owner_kind", "user")));
    }

    /// <summary>
    /// The labels each of the broker's families carries in a single process (docs/metrics.md), the
    /// <c>le</c> of a histogram's buckets and the exporter's <c>otel_scope_*</c> aside.
    /// </summary>
    private static readonly Dictionary<string, string[]> SingleProcessLabels = new()
    {
        ["dmabroker_sessions"] = [],
        ["dmabroker_groups_owned"] = ["owner_kind"],
        ["dmabroker_watchers"] = [],
        ["dmabroker_claims_total"] = ["result"],
        ["dmabroker_dma_operations_total"] = ["direction"],
        ["dmabroker_dma_bytes_total"] = ["direction"],
        ["dmabroker_dma_faults_total"] = ["reason"],
        ["dmabroker_session_release_duration_seconds"] = ["reason"],
    };

    [Fact]
    public async Task Scrape_ClusterReplica_EveryBrokerSeriesCarriesTheReplica_AndTargetInfoNamesIt()
    {
        await using var etcd = await Cluster.Tests.EtcdCluster.StartAsync();
        await using var broker = await TestBroker.StartAsync(null, "--cluster", "etcd",
            "--etcd-endpoints", etcd.Endpoints[0].GetLeftPart(UriPartial.Authority), "--replica", "metrics-r1");
        await using (var session = await broker.Client.OpenSessionAsync("replica"))
        {
            await (await session.NewContainerAsync(ContainerType.Type1V2)).SetGroupAsync(Group);
        }
        await using var open = await broker.Client.OpenSessionAsync("open");

        var scrape = await ScrapeAsync(broker.WebAddress);

        var ours = scrape.Samples.Where(s => s.Name.StartsWith("dmabroker_", StringComparison.Ordinal)).ToList();
        Assert.Equal(SingleProcessLabels.Keys.Order(), ours.Select(Family).Distinct().Order());
        Assert.All(ours, s => Assert.Equal("metrics-r1", s.Labels.GetValueOrDefault(Core.Telemetry.BrokerMetrics.ReplicaTag)));
        Assert.All(ours, s => Assert.Equal(SingleProcessLabels[Family(s)].Append(Core.Telemetry.BrokerMetrics.ReplicaTag).Order(), BrokerLabels(s)));
        Assert.Equal(1, scrape.Value("dmabroker_sessions", ("replica", "metrics-r1")));
        Assert.Equal(1, scrape.Value("dmabroker_claims_total", ("result", "ok"), ("replica", "metrics-r1")));
        Assert.Equal(1, scrape.Value("dmabroker_session_release_duration_seconds_count", ("reason", "client_closed"), ("replica", "metrics-r1")));
        // OpenTelemetry's resource, as Prometheus sees it: the replica is the service instance.
        Assert.Equal(1, scrape.Value("target_info", ("service_name", "dmabroker"), ("service_instance_id", "metrics-r1")));
    }

    [Fact]
    public async Task Scrape_SingleProcess_NoReplicaLabel_EachFamilyHasItsDocumentedLabelsOnly()
    {
        await using var broker = await TestBroker.StartAsync();
        await using (var session = await broker.Client.OpenSessionAsync("single"))
        {
            await (await session.NewContainerAsync(ContainerType.Type1V2)).SetGroupAsync(Group);
        }
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();

        var scrape = await ScrapeAsync(broker.WebAddress);

        var ours = scrape.Samples.Where(s => s.Name.StartsWith("dmabroker_", StringComparison.Ordinal)).ToList();
        Assert.Equal(SingleProcessLabels.Keys.Order(), ours.Select(Family).Distinct().Order());
        Assert.All(ours, s => Assert.Equal(SingleProcessLabels[Family(s)].Order(), BrokerLabels(s)));
        Assert.DoesNotContain(scrape.Samples, s => s.Labels.ContainsKey(Core.Telemetry.BrokerMetrics.ReplicaTag));
    }

    // A sample's family: its name without a histogram's _bucket, _sum or _count.
    private static string Family(PrometheusSample sample) =>
        SingleProcessLabels.ContainsKey(sample.Name) ? sample.Name
            : sample.Name[..sample.Name.LastIndexOf('_')] is var family && SingleProcessLabels.ContainsKey(family) ? family : sample.Name;

    // The labels the broker gave a sample, in order: le and the exporter's otel_scope_* left out.
    private static string[] BrokerLabels(PrometheusSample sample) =>
        [.. sample.Labels.Keys.Where(k => k != "le" && !k.StartsWith("otel_scope_", StringComparison.Ordinal)).Order()];

    [Fact]
    public async Task Otlp_EndpointConfigured_ExportsTheBrokerMetersOverHttpProtobuf()
    {
        await using var receiver = await OtlpReceiver.StartAsync();
        await using var broker = await TestBroker.StartAsync(null, $"--{BrokerTelemetry.OtlpEndpointSetting}={receiver.Address}",
            "--OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf", "--OTEL_METRIC_EXPORT_INTERVAL=100");

        var (path, contentType, body) = await receiver.FirstExport.WaitAsync(TestBroker.Timeout);

        Assert.Equal("/v1/metrics", path);
        Assert.Equal("application/x-protobuf", contentType);
        // The protobuf carries the meter's and its instruments' names as UTF-8 strings.
        Assert.Contains("dmabroker.sessions", Encoding.UTF8.GetString(body), StringComparison.Ordinal);
        Assert.Equal(new Uri(receiver.Address), broker.Services.GetRequiredService<MetricsExport>().Otlp);
    }

    [Theory]
    [InlineData(null, null)]
    [InlineData("", null)]
    [InlineData("http://collector:4318", "http://collector:4318/")]
    public void OtlpEndpoint_OnlyWhenTheSettingNamesOne(string? setting, string? expected)
    {
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?> { [BrokerTelemetry.OtlpEndpointSetting] = setting }).Build();

        Assert.Equal(expected, BrokerTelemetry.OtlpEndpoint(configuration)?.ToString());
    }

    [Fact]
    public async Task Otlp_NotConfigured_NoOtlpExporter()
    {
        await using var broker = await TestBroker.StartAsync();

        var export = broker.Services.GetRequiredService<MetricsExport>();

        Assert.Null(export.Otlp);
        Assert.True(export.Prometheus);
    }

    [Fact]
    public void OtlpEndpoint_NotAnHttpUrl_EndsTheStartWithOneLine()
    {
        var e = Assert.Throws<ArgumentException>(() => BrokerHost.Build(["--listen", "http://127.0.0.1:0", $"--{BrokerTelemetry.OtlpEndpointSetting}=collector:4318"]));

        Assert.Equal($"{BrokerTelemetry.OtlpEndpointSetting} takes an http:// or https:// URL, got 'collector:4318'", e.Message);
    }

    /// <summary>A tiny OTLP/HTTP collector on a free loopback port: it keeps the first export it is sent.</summary>
    private sealed class OtlpReceiver(WebApplication app, TaskCompletionSource<(string, string?, byte[])> first) : IAsyncDisposable
    {
        public string Address { get; } = app.Urls.Single();
        public Task<(string Path, string? ContentType, byte[] Body)> FirstExport => first.Task;

        public static async Task<OtlpReceiver> StartAsync()
        {
            var builder = WebApplication.CreateSlimBuilder();
            builder.Logging.ClearProviders();
            builder.WebHost.UseUrls("http://127.0.0.1:0");
            var app = builder.Build();
            var first = new TaskCompletionSource<(string, string?, byte[])>(TaskCreationOptions.RunContinuationsAsynchronously);
            app.MapPost("/{**path}", async (HttpContext http) =>
            {
                using var body = new MemoryStream();
                await http.Request.Body.CopyToAsync(body);
                first.TrySetResult((http.Request.Path.Value ?? "", http.Request.ContentType, body.ToArray()));
                // An empty ExportMetricsServiceResponse: everything accepted.
                http.Response.ContentType = "application/x-protobuf";
            });
            await app.StartAsync();
            return new OtlpReceiver(app, first);
        }

        public async ValueTask DisposeAsync()
        {
            await app.StopAsync();
            await app.DisposeAsync();
        }
    }
}
