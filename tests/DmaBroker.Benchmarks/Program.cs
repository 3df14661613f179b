using System.Globalization;
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

// Side-by-side DMA benchmarks on loopback: the broker's Dma.Stream against a raw gRPC stream of
// the same messages, alternating in one run so machine noise hits both alike.
//   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- [--rounds N] [--seconds S]
// What authentication costs claim+release calls (see AuthBenchmark):
//   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- auth [--rounds N] [--seconds S] [--sessions N]
// The client processes the sigkill and sessions benchmarks start (this program again, see BenchChild).
if (args is [BenchChild.Mode, ..])
{
    await BenchChild.RunAsync(args);
    return;
}
// Release after SIGKILL seen by a watcher, idle and under 1,000 pinging sessions; 10,000 sessions on one broker (see SigkillBenchmark, SessionsBenchmark):
//   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- sigkill|sessions [--quick]
if (args is ["sigkill" or "sessions", ..])
{
    IBenchSection section = args[0] == "sigkill" ? new SigkillBenchmark() : new SessionsBenchmark();
    foreach (var row in await section.RunAsync(new BenchOptions(Arg("--rounds", 5), Arg("--seconds", 2.0), args.Contains("--quick"))))
        Console.WriteLine($"{row.Name}: {row.Result} | {row.Baseline} | {row.Ratio}\n  {row.Detail}");
    return;
}
if (args is ["auth", ..])
{
    await AuthBenchmark.RunAsync(Arg("--rounds", 7), Arg("--seconds", 2.0), Arg("--sessions", 4));
    return;
}
// What collecting the DmaBroker meter costs DMA-stream throughput (see MetricsBenchmark):
//   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- metrics [--rounds N] [--seconds S]
if (args is ["metrics", ..])
{
    await MetricsBenchmark.RunAsync(Arg("--rounds", 7), Arg("--seconds", 2.0));
    return;
}

// NVMe reads through the NvmeDriver sample's queue pair beside edu DMA of the same sizes (see NvmeBenchmark):
//   dotnet run -c Release --project tests/DmaBroker.Benchmarks -- nvme [--rounds N] [--seconds S] [--qd 32]
if (args is ["nvme", ..])
{
    await NvmeBenchmark.RunAsync(Arg("--rounds", 5), Arg("--seconds", 2.0), Arg("--qd", 32));
    return;
}

var rounds = Arg("--rounds", 5);
var seconds = Arg("--seconds", 2.0);

await using var broker = await Host.StartBrokerAsync();
await using var raw = await Host.StartRawAsync();
using var brokerClient = BrokerClient.Connect(broker.Address);
using var rawClient = BrokerClient.Connect(raw.Address);
await using var session = await brokerClient.OpenSessionAsync("bench");
var handle = await Host.PrepareDeviceAsync(session);

Console.WriteLine($"DmaBroker side-by-side benchmark: {rounds} rounds x {seconds:F1} s per side, loopback, {Environment.ProcessorCount} cores");
foreach (var scenario in DmaLoad.Scenarios)
{
    var (name, unit, make, opsPerMessage, _, makeCoalesced) = scenario;
    var requests = make();
    var coalesced = makeCoalesced?.Invoke();
    var brokerRates = new List<double>();
    var coalescedRates = new List<double>();
    var rawRates = new List<double>();
    for (var round = 0; round < rounds; round++)
    {
        // The raw stream always answers each request on its own: the message rate to beat.
        rawRates.Add(await DmaLoad.MeasureAsync(new Dma.DmaClient(rawClient.Raw.Channel).Stream(), null, requests, opsPerMessage, seconds));
        brokerRates.Add(await DmaLoad.MeasureAsync(session.Raw.Dma.Stream(), handle, requests, opsPerMessage, seconds));
        if (coalesced is not null)
            coalescedRates.Add(await DmaLoad.MeasureAsync(session.Raw.Dma.Stream(), handle, coalesced, opsPerMessage, seconds));
    }
    var r = Rounds.Median(rawRates);
    Console.WriteLine($"{name}:");
    Row("broker Dma.Stream", brokerRates);
    if (coalesced is not null)
        Row("broker, coalesced", coalescedRates);
    Row("raw gRPC stream", rawRates);
    Console.WriteLine($"  broker / raw        {Rounds.Median(brokerRates) / r,10:P0}");
    if (coalesced is not null)
        Console.WriteLine($"  coalesced / raw     {Rounds.Median(coalescedRates) / r,10:P0}");

    void Row(string label, List<double> rates) =>
        Console.WriteLine($"  {label,-19} {scenario.Scale(Rounds.Median(rates)),10:F2} {unit}   (median of {rounds}; {string.Join(", ", rates.Select(x => scenario.Scale(x).ToString("F2", CultureInfo.InvariantCulture)))})");
}

await LookupBenchmark.RunAsync(rounds);

T Arg<T>(string name, T fallback) where T : IParsable<T>
{
    var i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? T.Parse(args[i + 1], CultureInfo.InvariantCulture) : fallback;
}

internal sealed class Host(WebApplication app, string address) : IAsyncDisposable
{
    public const ulong Iova = 0x100_0000;
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
        var vaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = 1 << 20 })).Vaddr;
        await session.Raw.Vfio.MapDmaAsync(new MapDmaRequest { ContainerId = container, Vaddr = vaddr, Iova = Iova, Size = 1 << 20, Read = true, Write = true });
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
