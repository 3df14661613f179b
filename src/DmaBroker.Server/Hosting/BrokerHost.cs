using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using DmaBroker.Cluster;
using DmaBroker.Core;
using DmaBroker.Core.Access;
using DmaBroker.Core.Topology;
using DmaBroker.Server.Services;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Grpc.AspNetCore.Server.Model;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Diagnostics.HealthChecks;

namespace DmaBroker.Server.Hosting;

/// <summary>Settings of a broker process, from the command line, environment or appsettings.</summary>
public sealed record BrokerHostOptions
{
    public const string Section = "DmaBroker";
    public const string DefaultListen = "http://127.0.0.1:50051";

    /// <summary>
    /// Where to listen, one or more of <c>http://host:port</c>, <c>https://host:port</c> and
    /// <c>unix:///path</c> (SPEC §12); each carries HTTP/2.
    /// </summary>
    public string[] Listen { get; init; } = [DefaultListen];

    /// <summary>
    /// The HTTP/1.1 listener for <c>/metrics</c>, the live view <c>/</c> and <c>/events</c>
    /// (SPEC §13): an http://, https:// or unix:// address, or <c>none</c>.
    /// </summary>
    public string HttpListen { get; init; } = WebListener.DefaultAddress;

    /// <summary>The auth file (SPEC §12); without one the broker runs in open mode.</summary>
    public string? AuthFile { get; init; }

    /// <summary>Allows open mode on a listener other hosts can reach.</summary>
    public bool Insecure { get; init; }

    /// <summary>The server certificate (PEM) for https:// listeners.</summary>
    public string? TlsCert { get; init; }

    /// <summary>The server certificate's private key (PEM).</summary>
    public string? TlsKey { get; init; }

    /// <summary>CA certificates (PEM); with it, https:// listeners require client certificates issued by them (mTLS).</summary>
    public string? ClientCa { get; init; }

    /// <summary>The file mode of Unix socket listeners, octal.</summary>
    public string UnixSocketMode { get; init; } = "0660";

    /// <summary>A topology JSON file; the embedded default topology when empty.</summary>
    public string? Topology { get; init; }

    /// <summary>A session that sends nothing for this long ends.</summary>
    public int LeaseTtlMs { get; init; } = 3000;

    /// <summary>HTTP/2 keepalive ping interval; a connection that misses pings for a lease TTL is dropped.</summary>
    public int KeepAlivePingMs { get; init; } = 1000;

    /// <summary>
    /// Concurrent HTTP/2 streams one client connection may carry: sessions, DMA streams, watches and
    /// calls in flight. A client with more opens further connections (the C# client library does so by itself).
    /// </summary>
    public int MaxStreamsPerConnection { get; init; } = BrokerHost.MaxStreamsPerConnection;

    /// <summary>Events a watcher may fall behind before it is resynchronised.</summary>
    public int WatchBuffer { get; init; } = 1024;

    /// <summary>
    /// The nice value (0 to 19) of the threads on which devices do their heavy work (an NVMe
    /// doorbell's commands and transfers): above 0, control calls take the CPU first.
    /// </summary>
    public int DeviceNice { get; init; } = BrokerOptions.DefaultDeviceNice;

    /// <summary>Memory one session may allocate, in MiB (like RLIMIT_MEMLOCK).</summary>
    public int MemoryLimitMb { get; init; } = 256;

    /// <summary>Mappings per container (dma_avail).</summary>
    public int DmaLimit { get; init; } = 65535;

    /// <summary>How long stopping waits for every session to end (each told `revoked`) before the server stops anyway.</summary>
    public TimeSpan ShutdownGrace { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>The console log's format: <c>text</c>, one line per event, or <c>json</c>, one JSON object per line.</summary>
    public string LogFormat { get; init; } = "text";

    /// <summary>
    /// Where group ownership is decided (SPEC §16): <c>none</c>, this process alone, or <c>etcd</c>,
    /// shared with the other replicas on the same etcd.
    /// </summary>
    public string Cluster { get; init; } = "none";

    /// <summary>The etcd members' client URLs (http://host:port), separated by commas or spaces; with <c>--cluster etcd</c>.</summary>
    public string? EtcdEndpoints { get; init; }

    /// <summary>This replica's name, unique in the cluster; with <c>--cluster etcd</c>.</summary>
    public string? Replica { get; init; }
}

/// <summary>Builds the broker's web host; Program and the tests share it.</summary>
public static class BrokerHost
{
    public const string Usage = """
        DmaBroker: a gRPC service that plays a host's IOMMU and VFIO for remote clients.

        Usage: dotnet run --project src/DmaBroker.Server -- [options]

        Options:
          --listen <url>        where to serve gRPC; repeat for several  [default: http://127.0.0.1:50051]
                                http://host:port (HTTP/2 cleartext), https://host:port (TLS),
                                unix:///path (Unix socket: callers are known by uid)
          --http-listen <url>   where to serve /metrics, the live view / and /events over HTTP/1.1,
                                or none                                  [default: http://127.0.0.1:9464]
          --auth-file <json>    principals, roles, groups and quotas     [default: open mode]
                                (reloaded when it changes; see docs/auth.example.json)
          --insecure            allow open mode on a non-loopback listener
          --tls-cert <pem>      server certificate for https:// listeners
          --tls-key <pem>       its private key
          --client-ca <pem>     require client certificates issued by these CAs (mTLS)
          --unix-socket-mode <octal>  file mode of unix:// sockets       [default: 0660]
          --topology <file>     a topology JSON file                     [default: the embedded topology]
          --lease-ttl-ms <ms>   end a session silent for this long        [default: 3000]
          --keepalive-ms <ms>   HTTP/2 keepalive ping interval           [default: 1000]
          --max-streams-per-connection <n>  HTTP/2 streams (sessions, DMA streams, watches,
                                calls) one client connection may carry   [default: 1024]
          --watch-buffer <n>    events a watcher may lag before resync   [default: 1024]
          --device-nice <n>     nice value (0-19) of the threads devices do heavy
                                work on (NVMe commands), below control calls [default: 10]
          --memory-limit-mb <n> memory one session may allocate          [default: 256]
          --dma-limit <n>       mappings per container (dma_avail)       [default: 65535]
          --log-format <text|json>  console log: one line per event, or one JSON object per line
                                                                         [default: text]
          --cluster <none|etcd> share the group table with other replicas on etcd  [default: none]
          --etcd-endpoints <urls>  etcd client URLs, http://host:port, comma-separated (with --cluster etcd)
          --replica <name>      this replica's name, unique in the cluster: a-z 0-9 . _ - (with --cluster etcd)
          -h, --help            show this help

        Every option is also an environment variable named after it, DMABROKER_ and the option in
        capitals with '_' for '-' (DMABROKER_LEASE_TTL_MS=5000, DMABROKER_AUTH_FILE=...,
        DMABROKER_LISTEN="http://127.0.0.1:50051 unix:///run/dmabroker.sock" for several), and a
        setting DmaBroker:<Name> (environment DmaBroker__LeaseTtlMs=5000, or appsettings.json in the
        working directory: { "DmaBroker": { "LeaseTtlMs": 5000 } }). Any setting may be given as
        --Section:Key=value (--Logging:LogLevel:Default=Debug). The command line wins over the
        environment, which wins over appsettings.json. DMABROKER_TOKEN and DMABROKER_ADDRESS are
        the clients' (dmactl's) and are ignored here. An unknown option, an option without its
        value or a bad value, wherever it comes from, ends the start with one line, exit 2.
        OpenTelemetry's OTEL_* settings come from the environment or as --OTEL_NAME=value:
        OTEL_EXPORTER_OTLP_ENDPOINT turns OTLP export of the metrics (served at /metrics) on.
        Without --auth-file every caller is 'anonymous' with every role (open mode); open mode is
        refused on a listener other hosts can reach unless --insecure is given.
        """;

    private static readonly Dictionary<string, string> Switches = new()
    {
        ["--auth-file"] = "DmaBroker:AuthFile",
        ["--http-listen"] = "DmaBroker:HttpListen",
        ["--tls-cert"] = "DmaBroker:TlsCert",
        ["--tls-key"] = "DmaBroker:TlsKey",
        ["--client-ca"] = "DmaBroker:ClientCa",
        ["--unix-socket-mode"] = "DmaBroker:UnixSocketMode",
        ["--topology"] = "DmaBroker:Topology",
        ["--lease-ttl-ms"] = "DmaBroker:LeaseTtlMs",
        ["--keepalive-ms"] = "DmaBroker:KeepAlivePingMs",
        ["--max-streams-per-connection"] = "DmaBroker:MaxStreamsPerConnection",
        ["--watch-buffer"] = "DmaBroker:WatchBuffer",
        ["--device-nice"] = "DmaBroker:DeviceNice",
        ["--memory-limit-mb"] = "DmaBroker:MemoryLimitMb",
        ["--dma-limit"] = "DmaBroker:DmaLimit",
        ["--log-format"] = "DmaBroker:LogFormat",
        ["--cluster"] = "DmaBroker:Cluster",
        ["--etcd-endpoints"] = "DmaBroker:EtcdEndpoints",
        ["--replica"] = "DmaBroker:Replica",
    };

    /// <summary>Every long option and the setting it sets: <see cref="Switches"/>, --listen and --insecure.</summary>
    private static readonly Dictionary<string, string> Options = new(Switches)
    {
        ["--listen"] = "DmaBroker:Listen",
        ["--insecure"] = "DmaBroker:Insecure",
    };

    /// <summary>The broker's own gRPC services, by full name, as health checks and reflection know them.</summary>
    public static IReadOnlyList<string> ServedServices { get; } =
    [
        Protocol.V1.Topology.Descriptor.FullName, Protocol.V1.Kernel.Descriptor.FullName, Protocol.V1.Session.Descriptor.FullName,
        Protocol.V1.Vfio.Descriptor.FullName, Protocol.V1.Memory.Descriptor.FullName, Protocol.V1.Dma.Descriptor.FullName,
    ];

    /// <summary>Concurrent HTTP/2 streams (sessions, DMA streams, calls) per client connection, unless <c>--max-streams-per-connection</c> says otherwise.</summary>
    public const int MaxStreamsPerConnection = 1024;

    /// <summary>Builds the app. <paramref name="configure"/> lets tests replace services such as the clock.</summary>
    public static WebApplication Build(string[] args, Action<IServiceCollection>? configure = null) => Build(args, null, null, configure);

    /// <summary>
    /// Builds the app with <paramref name="environment"/> standing in for the process's environment
    /// variables and <paramref name="contentRoot"/> (where appsettings.json is read) for the working
    /// directory, so tests running side by side can each have their own.
    /// </summary>
    internal static WebApplication Build(string[] args, System.Collections.IDictionary? environment, string? contentRoot, Action<IServiceCollection>? configure)
    {
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [], ContentRootPath = contentRoot });
        // Framework request logs (ASP.NET Core's, gRPC's) at Warning unless a setting says
        // otherwise: the sources added after this one (appsettings.json, environment) and the
        // command line still win.
        builder.Configuration.Sources.Insert(0, new Microsoft.Extensions.Configuration.Memory.MemoryConfigurationSource
        {
            InitialData = new Dictionary<string, string?>
            {
                ["Logging:LogLevel:Microsoft.AspNetCore"] = "Warning",
                ["Logging:LogLevel:Grpc"] = "Warning",
            },
        });
        var ignoredVariables = BrokerSettings.AddEnvironment(builder.Configuration, environment, Options);
        builder.Configuration.AddCommandLine(ParseArguments(args));
        var options = BrokerSettings.Read(builder.Configuration, Options);
        string Origin(string setting) => BrokerSettings.Origin(builder.Configuration, $"{BrokerHostOptions.Section}:{setting}", Options);
        Validate(options, Origin);
        var listeners = ParseListeners(options, Origin(nameof(BrokerHostOptions.Listen)));
        var web = NamingOrigin(() => WebListener.Parse(options.HttpListen), Origin(nameof(BrokerHostOptions.HttpListen)), "--http-listen");
        Listener[] every = web.Listener is { } webListener ? [.. listeners, webListener] : listeners;
        ConfigureConsole(builder.Logging, options.LogFormat);
        CheckOpenMode(options, every);
        CheckPortsFree(every);
        var topology = string.IsNullOrEmpty(options.Topology) ? TopologyDocument.Default() : TopologyDocument.Load(options.Topology);
        var leaseTtl = TimeSpan.FromMilliseconds(options.LeaseTtlMs);
        var serverCertificate = LoadServerCertificate(options, every);
        var clientTrust = options.ClientCa is { } ca ? ClientCertificateTrust.Load(ca) : null;
        var memoryLimit = (ulong)options.MemoryLimitMb * 1024 * 1024;
        var cluster = ClusterOptions(options, leaseTtl, Origin);

        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            foreach (var listener in listeners)
                listener.Configure(kestrel, serverCertificate, clientTrust is not null);
            // Last, so that the gRPC listeners' addresses come first in the server's list.
            web.Configure(kestrel, serverCertificate, clientTrust is not null);
            // A hung client's connection is dropped when it stops answering pings; its lease ends it even sooner.
            kestrel.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromMilliseconds(options.KeepAlivePingMs);
            // (Kestrel takes no ping timeout under a second; a shorter lease still ends the session.)
            kestrel.Limits.Http2.KeepAlivePingTimeout = leaseTtl < TimeSpan.FromSeconds(1) ? TimeSpan.FromSeconds(1) : leaseTtl;
            // Sessions and DMA streams are long-lived streams: many share one client connection.
            // Kestrel's rapid-reset defence also scales with this: it answers ENHANCE_YOUR_CALM
            // (and then closes the connection, ending its sessions) once a connection has about
            // twice this many streams refused or reset within a few seconds. At 100 (the default) a
            // client retrying refused Session.Opens from a few workers reached that in seconds.
            kestrel.Limits.Http2.MaxStreamsPerConnection = options.MaxStreamsPerConnection;
        });

        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton(web);
        builder.Services.AddSingleton(sp => new AccessControl(options.AuthFile,
            Quotas.Default with { MemoryBytes = memoryLimit, Mappings = options.DmaLimit },
            Quotas.Unlimited(memoryLimit, options.DmaLimit),
            sp.GetRequiredService<ILogger<AccessControl>>()));
        builder.Services.AddSingleton<BrokerAudit>();
        builder.Services.AddSingleton(sp => new AccessGate(sp.GetRequiredService<AccessControl>(), clientTrust, sp.GetRequiredService<BrokerAudit>()));
        builder.Services.AddSingleton(TimeProvider.System);
        if (cluster is not null)
        {
            builder.Services.AddSingleton(sp => EtcdOwnershipStore.ConnectAsync(cluster, sp.GetRequiredService<TimeProvider>(),
                sp.GetRequiredService<ILoggerFactory>().CreateLogger("DmaBroker.Cluster")).GetAwaiter().GetResult());
            builder.Services.AddHostedService<ClusterStart>();
        }
        builder.Services.AddSingleton(sp =>
        {
            // Files a killed broker left under /dev/shm go before this one shares any memory (SPEC §15).
            if (Broker.RemoveOrphanedSharedMemory() is > 0 and var orphans)
            {
                var startup = sp.GetRequiredService<ILoggerFactory>().CreateLogger("DmaBroker.Server.Startup");
                StartupLog.SharedMemoryOrphansRemoved(startup, orphans);
            }
            return new Broker(topology, new BrokerOptions
            {
                Store = cluster is null ? null : sp.GetRequiredService<EtcdOwnershipStore>(),
                Sessions = new Core.Sessions.SessionOptions
                {
                    LeaseTtl = leaseTtl,
                    MemoryLimit = (ulong)options.MemoryLimitMb * 1024 * 1024,
                    DmaLimit = options.DmaLimit,
                },
                WatchBuffer = options.WatchBuffer,
                DeviceNice = options.DeviceNice,
            }, sp.GetRequiredService<TimeProvider>(), sp.GetRequiredService<System.Diagnostics.Metrics.IMeterFactory>(), sp.GetRequiredService<BrokerAudit>().Record);
        });
        builder.AddBrokerMetrics(web, cluster?.Replica);
        builder.Services.AddGrpc(grpc =>
        {
            grpc.Interceptors.Add<ErrorInterceptor>();
            // Inside ErrorInterceptor: it sees the core's typed errors.
            grpc.Interceptors.Add<AuditInterceptor>();
            grpc.MaxReceiveMessageSize = ErrorInterceptor.MaxMessageSize;
        });
        // Every service's requests are parsed by GuardedMethodProvider: malformed protobuf is EINVAL.
        builder.Services.RemoveAll(typeof(IServiceMethodProvider<>));
        builder.Services.TryAddEnumerable(ServiceDescriptor.Singleton(typeof(IServiceMethodProvider<>), typeof(GuardedMethodProvider<>)));
        builder.Services.AddGrpcReflection();
        // grpc.health.v1 answers for "" and for each service name (SPEC §13), all from the broker's check.
        builder.Services.AddGrpcHealthChecks(health =>
        {
            foreach (var service in ServedServices)
                health.Services.Map(service, _ => true);
        }).AddCheck("broker", () => HealthCheckResult.Healthy());
        builder.Services.AddSingleton<SessionCalls>();
        builder.Services.AddHostedService<SessionShutdown>();
        builder.Services.AddSingleton<LiveView.LiveViewEndpoints>();
        configure?.Invoke(builder.Services);

        var app = builder.Build();
        // Read now, so a bad auth file stops the start with its reason rather than failing the first call.
        var access = app.Services.GetRequiredService<AccessControl>();
        app.Use(ErrorInterceptor.AddErrnoToFrameworkErrors);
        app.Use(app.Services.GetRequiredService<AccessGate>().InvokeAsync);
        app.UseRouting();
        app.Use(WebListener.GateAsync);
        app.MapGrpcService<TopologyService>();
        app.MapGrpcService<KernelService>();
        app.MapGrpcService<SessionService>();
        app.MapGrpcService<VfioService>();
        app.MapGrpcService<MemoryService>();
        app.MapGrpcService<DmaService>();
        app.MapGrpcHealthChecksService();
        app.MapGrpcReflectionService();
        LiveView.LiveViewEndpoints.Map(app);
        app.MapBrokerMetrics(web);

        var socketMode = ParseMode(options.UnixSocketMode);
        app.Lifetime.ApplicationStarted.Register(() =>
        {
            if (OperatingSystem.IsWindows())
                return;
            foreach (var listener in every.Where(l => l.Kind == ListenerKind.Unix))
                File.SetUnixFileMode(listener.SocketPath!, socketMode);
        });
        app.Lifetime.ApplicationStopped.Register(access.Dispose);
        var startup = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("DmaBroker.Server.Startup");
        app.Lifetime.ApplicationStarted.Register(() =>
        {
            if (!startup.IsEnabled(LogLevel.Information))
                return;
            var snapshot = app.Services.GetRequiredService<Broker>().Journal.Current;
            var version = typeof(BrokerHost).Assembly.GetName().Version?.ToString(3) ?? "?";
            var served = string.Join(", ", app.Addresses()) + (web.Address is { } http ? $"; metrics and live view on {http}" : "");
            var auth = options.AuthFile is null ? "open mode (every caller is anonymous with every role)" : $"auth file {options.AuthFile} ({access.Current.Count} entries)";
            var source = string.IsNullOrEmpty(options.Topology) ? "the embedded default" : options.Topology;
            var clustered = cluster is null ? "none" : $"etcd ({string.Join(",", cluster.Endpoints)}) as replica {cluster.Replica}";
            StartupLog.Banner(startup, version, served, auth, source, snapshot.Devices.Count, snapshot.Groups.Count, options.LeaseTtlMs, clustered);
            foreach (var variable in ignoredVariables)
                StartupLog.VariableIgnored(startup, variable);
        });
        return app;
    }

    /// <summary>
    /// Starts a built app and returns the address it listens on, which is how a caller that asked
    /// for port 0 (tests, benchmarks) learns the port it got.
    /// </summary>
    public static async Task<string> StartAndGetAddressAsync(this WebApplication app)
    {
        await app.StartAsync();
        return app.Addresses().Single();
    }

    /// <summary>The gRPC addresses a started app listens on, one per <c>--listen</c>, with the ports it got.</summary>
    public static IReadOnlyList<string> Addresses(this WebApplication app)
    {
        var all = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()?.Addresses
            ?? throw new InvalidOperationException("the server reported no address");
        // The web listener is configured last, so it is the last address when it is on.
        var grpc = app.Services.GetRequiredService<WebListener>().Listener is null ? all : all.SkipLast(1);
        // Kestrel names a Unix socket http://unix:/path; clients and --listen say unix:///path.
        return [.. grpc.Select(a => a.StartsWith(KestrelUnixPrefix, StringComparison.Ordinal) ? "unix://" + a[KestrelUnixPrefix.Length..] : a)];
    }

    private const string KestrelUnixPrefix = "http://unix:";

    /// <summary>The started app's <c>--http-listen</c> address, with the port it got; null when off.</summary>
    public static string? WebAddress(this WebApplication app) => app.Services.GetRequiredService<WebListener>().Address;

    /// <summary>
    /// Reads the command line strictly: each option of <see cref="Usage"/> (a value after it or
    /// after '='), <c>--listen</c> as often as wanted, <c>--insecure</c> alone, and any setting as
    /// <c>--Section:Key=value</c> or, for OpenTelemetry's settings, <c>--OTEL_NAME=value</c>. Anything else, or an option without its value, is an
    /// <see cref="ArgumentException"/> with one line saying which. Returns the settings in the
    /// form the configuration's command-line reader takes, <c>--Key=value</c>.
    /// </summary>
    public static string[] ParseArguments(string[] args)
    {
        var settings = new List<string>(args.Length);
        var listens = 0;
        for (var i = 0; i < args.Length; i++)
        {
            var arg = args[i];
            var equals = arg.IndexOf('=', StringComparison.Ordinal);
            var name = equals > 0 ? arg[..equals] : arg;
            string Value()
            {
                if (equals > 0)
                    return arg[(equals + 1)..];
                if (i + 1 >= args.Length || args[i + 1].StartsWith("--", StringComparison.Ordinal))
                    throw new ArgumentException($"option {name} needs a value");
                return args[++i];
            }

            if (name == "--insecure")
                settings.Add($"--DmaBroker:Insecure={(equals > 0 ? Value() : "true")}");
            else if (name == "--listen")
                settings.Add($"--DmaBroker:Listen:{listens++}={Value()}");
            else if (Switches.TryGetValue(name, out var key))
                settings.Add($"--{key}={Value()}");
            else if (name.StartsWith("--", StringComparison.Ordinal) && (name.Contains(':', StringComparison.Ordinal) || name.StartsWith("--OTEL_", StringComparison.Ordinal)))
                settings.Add($"{name}={Value()}");
            else
                throw new ArgumentException($"unknown option {ErrnoException.Quote(arg)}");
        }
        return [.. settings];
    }

    /// <summary>
    /// A TCP port another process listens on ends the start with one line: Kestrel would log the
    /// bind failure as a critical error with its stack before giving up.
    /// </summary>
    private static void CheckPortsFree(Listener[] listeners)
    {
        foreach (var listener in listeners.Where(l => l.Kind != ListenerKind.Unix && l.Port != 0))
        {
            var address = listener.Address ?? System.Net.IPAddress.Loopback;
            using var probe = new System.Net.Sockets.Socket(address.AddressFamily, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
            try
            {
                probe.Bind(new System.Net.IPEndPoint(address, listener.Port));
            }
            catch (System.Net.Sockets.SocketException e) when (e.SocketErrorCode == System.Net.Sockets.SocketError.AddressAlreadyInUse)
            {
                throw new IOException($"{listener.Option} {listener.Text}: address already in use");
            }
        }
    }

    // A listen address from the environment or appsettings.json is named by where it came from.
    private static Listener[] ParseListeners(BrokerHostOptions options, string origin) =>
        [.. options.Listen.Select(text => NamingOrigin(() => Listener.Parse(text), origin, "--listen"))];

    /// <summary>A value's parse error, prefixed with where the value came from when that was not its option.</summary>
    private static T NamingOrigin<T>(Func<T> parse, string origin, string option)
    {
        try
        {
            return parse();
        }
        catch (ArgumentException e) when (origin != option)
        {
            throw new ArgumentException($"{origin}: {e.Message}", e);
        }
    }

    /// <summary>The console log: one line per event (text), or the built-in JSON formatter, one object per line.</summary>
    private static void ConfigureConsole(ILoggingBuilder logging, string format)
    {
        if (format == "json")
        {
            logging.AddJsonConsole(json =>
            {
                json.UseUtcTimestamp = true;
                json.TimestampFormat = "yyyy-MM-ddTHH:mm:ss.fffZ";
            });
        }
        else
        {
            logging.AddSimpleConsole(text => text.SingleLine = true);
        }
    }

    /// <summary>Open mode lets anyone who reaches the broker do anything: only on this host, unless --insecure.</summary>
    private static void CheckOpenMode(BrokerHostOptions options, Listener[] listeners)
    {
        if (options.AuthFile is not null || options.Insecure)
            return;
        if (listeners.FirstOrDefault(l => !l.IsLocal) is { } exposed)
            throw new ArgumentException($"refusing open mode on {exposed.Text}: without --auth-file anyone who reaches it may claim devices and revoke sessions; give --auth-file, listen on loopback or a unix:// socket, or accept the risk with --insecure");
    }

    private static X509Certificate2? LoadServerCertificate(BrokerHostOptions o, Listener[] listeners)
    {
        if (o.TlsCert is null != (o.TlsKey is null))
            throw new ArgumentException("--tls-cert and --tls-key go together: the server certificate and its private key, both PEM");
        if (o.TlsCert is null)
        {
            if (listeners.Any(l => l.Kind == ListenerKind.Https))
                throw new ArgumentException("an https:// listener needs --tls-cert and --tls-key");
            if (o.ClientCa is not null)
                throw new ArgumentException("--client-ca needs an https:// listener with --tls-cert and --tls-key");
            return null;
        }
        try
        {
            return X509Certificate2.CreateFromPemFile(o.TlsCert, o.TlsKey);
        }
        catch (Exception e) when (e is CryptographicException or IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"cannot load --tls-cert {o.TlsCert} with --tls-key {o.TlsKey}: {e.Message}", e);
        }
    }

    private static UnixFileMode ParseMode(string text, string origin = "--unix-socket-mode") =>
        text.Length is >= 3 and <= 4 && text.All(c => c is >= '0' and <= '7')
            ? (UnixFileMode)Convert.ToInt32(text, 8)
            : throw new ArgumentException($"{origin} takes an octal mode such as 0660, got {ErrnoException.Quote(text)}");

    // name: where a setting's value came from (its option, variable or file), for the message.
    private static void Validate(BrokerHostOptions o, Func<string, string> name)
    {
        ParseMode(o.UnixSocketMode, name(nameof(o.UnixSocketMode)));
        if (o.LeaseTtlMs is < 100 or > 3_600_000)
            throw new ArgumentException($"{name(nameof(o.LeaseTtlMs))} must be between 100 and 3600000, got {o.LeaseTtlMs}");
        // Kestrel pings at most once a second.
        if (o.KeepAlivePingMs is < 1000 or > 3_600_000)
            throw new ArgumentException($"{name(nameof(o.KeepAlivePingMs))} must be between 1000 and 3600000, got {o.KeepAlivePingMs}");
        if (o.MaxStreamsPerConnection is < 1 or > 1_000_000)
            throw new ArgumentException($"{name(nameof(o.MaxStreamsPerConnection))} must be between 1 and 1000000, got {o.MaxStreamsPerConnection}");
        if (o.DeviceNice is < 0 or > 19)
            throw new ArgumentException($"{name(nameof(o.DeviceNice))} must be between 0 and 19, got {o.DeviceNice}");
        if (o.MemoryLimitMb is < 1 or > 1_048_576)
            throw new ArgumentException($"{name(nameof(o.MemoryLimitMb))} must be between 1 and 1048576, got {o.MemoryLimitMb}");
        if (o.DmaLimit is < 1 or > 1_000_000)
            throw new ArgumentException($"{name(nameof(o.DmaLimit))} must be between 1 and 1000000, got {o.DmaLimit}");
        if (o.WatchBuffer is < 1 or > 1_000_000)
            throw new ArgumentException($"{name(nameof(o.WatchBuffer))} must be between 1 and 1000000, got {o.WatchBuffer}");
        if (o.ShutdownGrace < TimeSpan.Zero || o.ShutdownGrace > TimeSpan.FromHours(1))
            throw new ArgumentException($"{name(nameof(o.ShutdownGrace))} must be between 00:00:00 and 01:00:00, got {o.ShutdownGrace}");
        if (o.LogFormat is not ("text" or "json"))
            throw new ArgumentException($"{name(nameof(o.LogFormat))} takes text or json, got {ErrnoException.Quote(o.LogFormat)}");
        if (o.Cluster is not ("none" or "etcd"))
            throw new ArgumentException($"{name(nameof(o.Cluster))} takes none or etcd, got {ErrnoException.Quote(o.Cluster)}");
    }

    /// <summary>
    /// The etcd store's options for <c>--cluster etcd</c> (both <c>--etcd-endpoints</c> and
    /// <c>--replica</c> needed), or null for <c>--cluster none</c> (neither allowed).
    /// </summary>
    private static EtcdStoreOptions? ClusterOptions(BrokerHostOptions o, TimeSpan leaseTtl, Func<string, string> name)
    {
        if (o.Cluster != "etcd")
        {
            if (o.EtcdEndpoints is not null || o.Replica is not null)
                throw new ArgumentException($"{name(o.EtcdEndpoints is not null ? nameof(o.EtcdEndpoints) : nameof(o.Replica))} needs --cluster etcd");
            return null;
        }
        if (string.IsNullOrWhiteSpace(o.EtcdEndpoints))
            throw new ArgumentException("--cluster etcd needs --etcd-endpoints, the etcd members' client URLs (http://host:port, comma-separated)");
        if (string.IsNullOrWhiteSpace(o.Replica))
            throw new ArgumentException("--cluster etcd needs --replica, this replica's name, unique in the cluster");
        var endpoints = new List<Uri>();
        foreach (var text in o.EtcdEndpoints.Split([',', ' ', '\t'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            if (!Uri.TryCreate(text, UriKind.Absolute, out var uri))
                throw new ArgumentException($"{name(nameof(o.EtcdEndpoints))} takes http://host:port URLs, got {ErrnoException.Quote(text)}");
            endpoints.Add(uri);
        }
        var cluster = new EtcdStoreOptions { Endpoints = endpoints, Replica = o.Replica, LeaseTtl = leaseTtl };
        try
        {
            cluster.Validate();
        }
        catch (ErrnoException e)
        {
            throw new ArgumentException($"{name(e.Message.StartsWith("replica", StringComparison.Ordinal) ? nameof(o.Replica) : nameof(o.EtcdEndpoints))}: {e.Message}", e);
        }
        return cluster;
    }
}

/// <summary>The broker's start-up line: what it serves, how it authenticates, what it simulates.</summary>
internal static partial class StartupLog
{
    [LoggerMessage(EventId = 1, EventName = "Started", Level = LogLevel.Information,
        Message = "DmaBroker {Version} serving {Listeners}; auth: {Auth}; topology: {Topology} ({Devices} devices, {Groups} groups); lease TTL {LeaseTtlMs} ms; cluster: {Cluster}")]
    public static partial void Banner(ILogger logger, string version, string listeners, string auth, string topology, int devices, int groups, int leaseTtlMs, string cluster);

    [LoggerMessage(EventId = 2, EventName = "VariableIgnored", Level = LogLevel.Warning,
        Message = "environment variable {Variable} ignored: it names no broker option (see --help)")]
    public static partial void VariableIgnored(ILogger logger, string variable);

    [LoggerMessage(EventId = 3, EventName = "SharedMemoryOrphansRemoved", Level = LogLevel.Information,
        Message = "removed {Count} shared-memory file(s) under /dev/shm left by brokers no longer running")]
    public static partial void SharedMemoryOrphansRemoved(ILogger logger, int count);
}
