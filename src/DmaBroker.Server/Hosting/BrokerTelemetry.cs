using System.Diagnostics.Metrics;
using DmaBroker.Core.Telemetry;
using OpenTelemetry.Metrics;
using OpenTelemetry.Resources;

namespace DmaBroker.Server.Hosting;

/// <summary>Where the broker's metrics go: scraped at /metrics (when the web listener is on), and pushed over OTLP (when configured).</summary>
/// <param name="Prometheus">Served in Prometheus text format at <c>GET /metrics</c> on the web listener.</param>
/// <param name="Otlp">The OTLP endpoint they are exported to, or null.</param>
public sealed record MetricsExport(bool Prometheus, Uri? Otlp);

/// <summary>
/// The broker's metrics through OpenTelemetry (SPEC §13): the <c>DmaBroker</c> meter, ASP.NET
/// Core's and the runtime's, exported in Prometheus text format at <c>GET /metrics</c> on the
/// <c>--http-listen</c> listener, and over OTLP when <c>OTEL_EXPORTER_OTLP_ENDPOINT</c> is set.
/// </summary>
public static class BrokerTelemetry
{
    /// <summary>The OpenTelemetry setting (an environment variable, or any configuration source) that turns OTLP export on.</summary>
    public const string OtlpEndpointSetting = "OTEL_EXPORTER_OTLP_ENDPOINT";

    /// <summary>Where the Prometheus exporter answers, on the web listener.</summary>
    public const string ScrapePath = "/metrics";

    /// <summary>The OTLP endpoint the configuration names, or null when OTLP export is off.</summary>
    public static Uri? OtlpEndpoint(IConfiguration configuration)
    {
        var text = configuration[OtlpEndpointSetting];
        if (string.IsNullOrWhiteSpace(text))
            return null;
        return Uri.TryCreate(text, UriKind.Absolute, out var uri) && uri.Scheme is "http" or "https"
            ? uri
            : throw new ArgumentException($"{OtlpEndpointSetting} takes an http:// or https:// URL, got {Core.ErrnoException.Quote(text)}");
    }

    /// <summary>
    /// Registers the meter provider: the broker's meter, ASP.NET Core and runtime instrumentation,
    /// the Prometheus exporter when the web listener is on, OTLP when <see cref="OtlpEndpointSetting"/> is set.
    /// A cluster replica (<paramref name="replica"/>, SPEC §16) is the resource's <c>service.instance.id</c>
    /// (Prometheus: <c>target_info</c>), as well as the <c>replica</c> tag of the broker's own
    /// series; a single process keeps OpenTelemetry's generated instance id.
    /// </summary>
    public static void AddBrokerMetrics(this WebApplicationBuilder builder, WebListener web, string? replica = null)
    {
        var otlp = OtlpEndpoint(builder.Configuration);
        builder.Services.AddSingleton(new MetricsExport(web.Listener is not null, otlp));
        builder.Services.AddOpenTelemetry()
            .ConfigureResource(resource => resource.AddService("dmabroker",
                serviceVersion: typeof(BrokerTelemetry).Assembly.GetName().Version?.ToString(3),
                autoGenerateServiceInstanceId: replica is null, serviceInstanceId: replica))
            .WithMetrics(metrics =>
            {
                metrics.AddMeter(BrokerMetrics.MeterName)
                    .AddAspNetCoreInstrumentation()
                    .AddRuntimeInstrumentation();
                if (web.Listener is not null)
                {
                    // No cached scrape: a scraper reads the counts of that moment, as the tests do.
                    metrics.AddPrometheusExporter(prometheus => prometheus.ScrapeResponseCacheDurationMilliseconds = 0);
                }
                if (otlp is not null)
                    metrics.AddOtlpExporter();
            });
        builder.Services.ConfigureOpenTelemetryMeterProvider((services, metrics) =>
            metrics.AddView(OnlyThisHost(services.GetRequiredService<IMeterFactory>())));
    }

    /// <summary>Serves <c>GET /metrics</c> on the web listener (viewer role), or nothing when the listener is off.</summary>
    public static void MapBrokerMetrics(this WebApplication app, WebListener web)
    {
        if (web.Listener is not null)
            app.MapPrometheusScrapingEndpoint(ScrapePath).OnWebListener();
    }

    /// <summary>
    /// OpenTelemetry subscribes to meters by name across the process; a meter made by another
    /// host's <see cref="IMeterFactory"/> (another broker in the same process, as in tests) is
    /// that host's to export. Meters no factory made (the runtime's) are the process's, kept,
    /// except the broker's own meter: a <see cref="BrokerMetrics.MeterName"/> meter no factory
    /// made belongs to a broker built without a host (an embedder's, or a test's), never to this
    /// one. Kept, its instruments would be the same metric streams as this host's (OpenTelemetry
    /// merges instruments of equal meter name, version, tags and instrument name into one
    /// stream), reporting that broker's counts as this host's, and disposing it would end the
    /// shared streams, so that from the next collect this host's instruments are exported no more.
    /// </summary>
    private static Func<Instrument, MetricStreamConfiguration?> OnlyThisHost(IMeterFactory own) =>
        instrument => instrument.Meter.Scope switch
        {
            null when instrument.Meter.Name == BrokerMetrics.MeterName => MetricStreamConfiguration.Drop,
            null => null,
            var scope => ReferenceEquals(scope, own) ? null : MetricStreamConfiguration.Drop,
        };
}
