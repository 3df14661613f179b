using DmaBroker.Benchmarks;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using Google.Protobuf;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

// The client processes the sigkill and sessions sections start (this program again, see BenchChild).
if (args is [BenchChild.Mode, ..])
{
    await BenchChild.RunAsync(args);
    return 0;
}

// The benchmark table (issue 11): every section below, each row side by side with its baseline
// measured in the same run (alternating rounds), printed as one markdown table at the end.
//   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- [KEY ...] [--rounds N] [--seconds S] [--quick] [--list] [--help]
// A section is a class implementing IBenchSection in its own file; register it here, one line each,
// in the order its rows should appear in the table.
IBenchSection[] sections =
[
    new DmaSection(),
    new RoundTripSection(),
    new ClaimSection(),
    new NvmeLocalSection(),
    new UnmapBenchmark(),
    new SigkillBenchmark(),
    new SessionsBenchmark(),
    MicroSection.Lookup,
    MicroSection.Core,
    new NvmeSection(),
    new AuthSection(),
    new MetricsSection(),
    new ClusterBenchmark(),
];
return await BenchCommand.RunAsync(args, sections, Console.Out, Console.Error);

internal sealed class Host(WebApplication app, string address) : IAsyncDisposable
{
    public const ulong Iova = 0x100_0000;

    /// <summary>How much <see cref="PrepareDeviceAsync"/> maps at <see cref="Iova"/>.</summary>
    public const int MappedBytes = 1 << 20;
    public string Address { get; } = address;

    /// <summary>A broker on <paramref name="listen"/> (port 0: any free port) with further <paramref name="options"/>.</summary>
    public static Task<Host> StartBrokerAsync(string listen = "http://127.0.0.1:0", params string[] options) =>
        StartBrokerAsync(null, listen, options);

    /// <summary>As above, with <paramref name="configure"/> changing the broker's services.</summary>
    public static Task<Host> StartBrokerAsync(Action<IServiceCollection>? configure, string listen, params string[] options) =>
        StartAsync(BrokerHost.Build(["--listen", listen, "--http-listen", "none", "--Logging:LogLevel:Default=Warning", .. options], configure));

    /// <summary>The broker's core (a broker host only).</summary>
    public DmaBroker.Core.Broker Broker => app.Services.GetRequiredService<DmaBroker.Core.Broker>();

    /// <summary>The <c>--http-listen</c> address, or null when off.</summary>
    public string? WebAddress => app.WebAddress();

    public static async Task<Host> StartRawAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.SetMinimumLevel(LogLevel.Warning);
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.WebHost.ConfigureKestrel(k => k.ConfigureEndpointDefaults(e => e.Protocols = HttpProtocols.Http2));
        builder.Services.AddGrpc(o => o.MaxReceiveMessageSize = 16 * 1024 * 1024);
        var app = builder.Build();
        app.MapGrpcService<RawDmaService>();
        app.MapGrpcService<RawVfioService>();
        await app.StartAsync();
        // Not a broker host: its one address is Kestrel's own, not BrokerHost's list of gRPC listeners.
        return new Host(app, app.Urls.Single());
    }

    private static async Task<Host> StartAsync(WebApplication app)
    {
        return new Host(app, await app.StartAndGetAddressAsync());
    }

    /// <summary>Claims group 14, maps 1 MiB at <see cref="Iova"/>, opens the edu device with Bus Master on.</summary>
    public static async Task<ulong> PrepareDeviceAsync(BrokerSession session)
    {
        var container = await session.CreateContainerAsync(ContainerType.Type1V2);
        await session.SetContainerAsync(14, container);
        var vaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = MappedBytes })).Vaddr;
        await session.Raw.Vfio.MapDmaAsync(new MapDmaRequest { ContainerId = container, Vaddr = vaddr, Iova = Iova, Size = MappedBytes, Read = true, Write = true });
        var handle = (await session.Raw.Vfio.OpenDeviceAsync(new OpenDeviceRequest { Address = "0000:08:00.0" })).Handle;
        await session.Raw.Vfio.RegionWriteAsync(new RegionWriteRequest { Handle = handle, Index = 7, Offset = 4, Data = ByteString.CopyFrom(0x06, 0x00) });
        return handle;
    }

    public async ValueTask DisposeAsync()
    {
        await app.StopAsync();
        await app.DisposeAsync();
    }
}
