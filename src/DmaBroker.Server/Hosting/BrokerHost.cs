using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Server.Services;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Diagnostics.HealthChecks;

namespace DmaBroker.Server.Hosting;

/// <summary>Settings of a broker process, from the command line, environment or appsettings.</summary>
public sealed record BrokerHostOptions
{
    public const string Section = "DmaBroker";
    public const string DefaultListen = "http://127.0.0.1:50051";

    /// <summary>Where to listen (HTTP/2 cleartext).</summary>
    public string Listen { get; init; } = DefaultListen;

    /// <summary>A topology JSON file; the embedded default topology when empty.</summary>
    public string? Topology { get; init; }

    /// <summary>A session that sends nothing for this long ends.</summary>
    public int LeaseTtlMs { get; init; } = 3000;

    /// <summary>HTTP/2 keepalive ping interval; a connection that misses pings for a lease TTL is dropped.</summary>
    public int KeepAlivePingMs { get; init; } = 1000;

    /// <summary>Events a watcher may fall behind before it is resynchronised.</summary>
    public int WatchBuffer { get; init; } = 1024;

    /// <summary>Memory one session may allocate, in MiB (like RLIMIT_MEMLOCK).</summary>
    public int MemoryLimitMb { get; init; } = 256;

    /// <summary>Mappings per container (dma_avail).</summary>
    public int DmaLimit { get; init; } = 65535;

    /// <summary>How long stopping waits for every session to end (each told `revoked`) before the server stops anyway.</summary>
    public TimeSpan ShutdownGrace { get; init; } = TimeSpan.FromSeconds(5);
}

/// <summary>Builds the broker's web host; Program and the tests share it.</summary>
public static class BrokerHost
{
    public const string Usage = """
        DmaBroker: a gRPC service that plays a host's IOMMU and VFIO for remote clients.

        Usage: dotnet run --project src/DmaBroker.Server -- [options]

        Options:
          --listen <url>        where to serve gRPC (HTTP/2 cleartext)   [default: http://127.0.0.1:50051]
          --topology <file>     a topology JSON file                     [default: the embedded topology]
          --lease-ttl-ms <ms>   end a session silent for this long        [default: 3000]
          --keepalive-ms <ms>   HTTP/2 keepalive ping interval           [default: 1000]
          --watch-buffer <n>    events a watcher may lag before resync   [default: 1024]
          --memory-limit-mb <n> memory one session may allocate          [default: 256]
          --dma-limit <n>       mappings per container (dma_avail)       [default: 65535]
          -h, --help            show this help

        Every option is also a setting DmaBroker:<Name> (environment: DmaBroker__Listen=...).
        """;

    private static readonly Dictionary<string, string> Switches = new()
    {
        ["--listen"] = "DmaBroker:Listen",
        ["--topology"] = "DmaBroker:Topology",
        ["--lease-ttl-ms"] = "DmaBroker:LeaseTtlMs",
        ["--keepalive-ms"] = "DmaBroker:KeepAlivePingMs",
        ["--watch-buffer"] = "DmaBroker:WatchBuffer",
        ["--memory-limit-mb"] = "DmaBroker:MemoryLimitMb",
        ["--dma-limit"] = "DmaBroker:DmaLimit",
    };

    /// <summary>Builds the app. <paramref name="configure"/> lets tests replace services such as the clock.</summary>
    public static WebApplication Build(string[] args, Action<IServiceCollection>? configure = null)
    {
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.Configuration.AddCommandLine(args, Switches);
        var options = builder.Configuration.GetSection(BrokerHostOptions.Section).Get<BrokerHostOptions>() ?? new BrokerHostOptions();
        Validate(options);
        var topology = string.IsNullOrEmpty(options.Topology) ? TopologyDocument.Default() : TopologyDocument.Load(options.Topology);
        var leaseTtl = TimeSpan.FromMilliseconds(options.LeaseTtlMs);

        builder.WebHost.UseUrls(options.Listen);
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.ConfigureEndpointDefaults(endpoint => endpoint.Protocols = HttpProtocols.Http2);
            // A hung client's connection is dropped when it stops answering pings; its lease ends it even sooner.
            kestrel.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromMilliseconds(options.KeepAlivePingMs);
            kestrel.Limits.Http2.KeepAlivePingTimeout = leaseTtl;
        });

        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton(TimeProvider.System);
        builder.Services.AddSingleton(sp => new Broker(topology, new BrokerOptions
        {
            Sessions = new Core.Sessions.SessionOptions
            {
                LeaseTtl = leaseTtl,
                MemoryLimit = (ulong)options.MemoryLimitMb * 1024 * 1024,
                DmaLimit = options.DmaLimit,
            },
            WatchBuffer = options.WatchBuffer,
        }, sp.GetRequiredService<TimeProvider>()));
        builder.Services.AddGrpc(grpc =>
        {
            grpc.Interceptors.Add<ErrorInterceptor>();
            grpc.MaxReceiveMessageSize = ErrorInterceptor.MaxMessageSize;
        });
        builder.Services.AddGrpcReflection();
        builder.Services.AddGrpcHealthChecks().AddCheck("broker", () => HealthCheckResult.Healthy());
        builder.Services.AddHostedService<SessionShutdown>();
        configure?.Invoke(builder.Services);

        var app = builder.Build();
        app.Use(ErrorInterceptor.AddErrnoToFrameworkErrors);
        app.MapGrpcService<TopologyService>();
        app.MapGrpcService<KernelService>();
        app.MapGrpcService<SessionService>();
        app.MapGrpcService<VfioService>();
        app.MapGrpcService<MemoryService>();
        app.MapGrpcService<DmaService>();
        app.MapGrpcHealthChecksService();
        app.MapGrpcReflectionService();
        return app;
    }

    /// <summary>
    /// Starts a built app and returns the address it listens on, which is how a caller that asked
    /// for port 0 (tests, benchmarks) learns the port it got.
    /// </summary>
    public static async Task<string> StartAndGetAddressAsync(this WebApplication app)
    {
        await app.StartAsync();
        return app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()?.Addresses.Single()
            ?? throw new InvalidOperationException("the server reported no address");
    }

    private static void Validate(BrokerHostOptions o)
    {
        if (!Uri.TryCreate(o.Listen, UriKind.Absolute, out var uri) || uri.Scheme != "http")
            throw new ArgumentException($"--listen must be an http:// URL such as {BrokerHostOptions.DefaultListen}, got '{o.Listen}'");
        if (o.LeaseTtlMs is < 100 or > 3_600_000)
            throw new ArgumentException($"--lease-ttl-ms must be between 100 and 3600000, got {o.LeaseTtlMs}");
        if (o.KeepAlivePingMs is < 100 or > 3_600_000)
            throw new ArgumentException($"--keepalive-ms must be between 100 and 3600000, got {o.KeepAlivePingMs}");
        if (o.MemoryLimitMb is < 1 or > 1_048_576)
            throw new ArgumentException($"--memory-limit-mb must be between 1 and 1048576, got {o.MemoryLimitMb}");
        if (o.DmaLimit is < 1 or > 1_000_000)
            throw new ArgumentException($"--dma-limit must be between 1 and 1000000, got {o.DmaLimit}");
        if (o.WatchBuffer is < 1 or > 1_000_000)
            throw new ArgumentException($"--watch-buffer must be between 1 and 1000000, got {o.WatchBuffer}");
        if (o.ShutdownGrace < TimeSpan.Zero || o.ShutdownGrace > TimeSpan.FromHours(1))
            throw new ArgumentException($"DmaBroker:ShutdownGrace must be between 00:00:00 and 01:00:00, got {o.ShutdownGrace}");
    }
}
