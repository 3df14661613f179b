using System.Diagnostics;
using System.Globalization;
using DmaBroker.Benchmarks;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using Google.Protobuf;
using Grpc.Core;
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
if (args is ["auth", ..])
{
    await AuthBenchmark.RunAsync(Arg("--rounds", 7), Arg("--seconds", 2.0), Arg("--sessions", 4));
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

var scenarios = new (string Name, string Unit, Func<DmaRequest[]> Requests, int OpsPerMessage, int BytesPerOp)[]
{
    ("DMA write, 64 KiB operations", "MiB/s", () => Writes(1, 64 * 1024), 1, 64 * 1024),
    ("batched 64-byte writes (256 per batch)", "Mops/s", () => Writes(256, 64), 256, 64),
};

Console.WriteLine($"DmaBroker side-by-side benchmark: {rounds} rounds x {seconds:F1} s per side, loopback, {Environment.ProcessorCount} cores");
foreach (var (name, unit, make, opsPerMessage, bytesPerOp) in scenarios)
{
    var requests = make();
    var brokerRates = new List<double>();
    var rawRates = new List<double>();
    for (var round = 0; round < rounds; round++)
    {
        rawRates.Add(await Measure(new Dma.DmaClient(rawClient.Raw.Channel).Stream(), null, requests, opsPerMessage, seconds));
        brokerRates.Add(await Measure(session.Raw.Dma.Stream(), handle, requests, opsPerMessage, seconds));
    }
    double Scale(double opsPerSecond) => unit == "MiB/s" ? opsPerSecond * bytesPerOp / (1024 * 1024) : opsPerSecond / 1e6;
    var b = Rounds.Median(brokerRates);
    var r = Rounds.Median(rawRates);
    Console.WriteLine($"{name}:");
    Console.WriteLine($"  broker Dma.Stream   {Scale(b),10:F2} {unit}   (median of {rounds}; {string.Join(", ", brokerRates.Select(x => Scale(x).ToString("F2", CultureInfo.InvariantCulture)))})");
    Console.WriteLine($"  raw gRPC stream     {Scale(r),10:F2} {unit}   (median of {rounds}; {string.Join(", ", rawRates.Select(x => Scale(x).ToString("F2", CultureInfo.InvariantCulture)))})");
    Console.WriteLine($"  broker / raw        {b / r,10:P0}");
}

await LookupBenchmark.RunAsync(rounds);

static DmaRequest[] Writes(int perBatch, int size)
{
    var data = ByteString.CopyFrom(Enumerable.Range(0, size).Select(i => (byte)i).ToArray());
    if (perBatch == 1)
        return [.. Enumerable.Range(0, 64).Select(i => new DmaRequest { Tag = (ulong)i, Write = new DmaWrite { Iova = Host.Iova + (ulong)(i % 16) * (ulong)size, Data = data } })];
    var batch = new DmaBatch();
    for (var i = 0; i < perBatch; i++)
        batch.Requests.Add(new DmaRequest { Tag = (ulong)i, Write = new DmaWrite { Iova = Host.Iova + (ulong)i * 64, Data = data } });
    return [new DmaRequest { Batch = batch }];
}

// Pipelined: keeps up to 16 messages in flight and counts completed operations per second.
static async Task<double> Measure(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call, ulong? handle, DmaRequest[] requests, int opsPerMessage, double seconds)
{
    using var _ = call;
    await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = handle ?? 0 } });
    const int window = 16;
    var inFlight = new SemaphoreSlim(window);
    var stop = Stopwatch.StartNew();
    var deadline = TimeSpan.FromSeconds(seconds);
    long sent = 0;
    long completed = 0;
    var reader = Task.Run(async () =>
    {
        var perMessage = 0;
        while (await call.ResponseStream.MoveNext())
        {
            var c = call.ResponseStream.Current.Completion;
            if (c is null)
                continue;
            if (!c.Ok)
                throw new InvalidOperationException($"DMA failed: {c}");
            completed++;
            if (++perMessage == opsPerMessage)
            {
                perMessage = 0;
                inFlight.Release();
            }
        }
    });
    while (stop.Elapsed < deadline)
    {
        await inFlight.WaitAsync();
        await call.RequestStream.WriteAsync(requests[sent++ % requests.Length]);
    }
    for (var i = 0; i < window; i++)
        await inFlight.WaitAsync();
    var elapsed = stop.Elapsed.TotalSeconds;
    await call.RequestStream.CompleteAsync();
    await reader;
    return completed / elapsed;
}

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
        StartAsync(BrokerHost.Build(["--listen", listen, "--http-listen", "none", "--Logging:LogLevel:Default=Warning", .. options]));

    public static Task<Host> StartRawAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.SetMinimumLevel(LogLevel.Warning);
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.WebHost.ConfigureKestrel(k => k.ConfigureEndpointDefaults(e => e.Protocols = HttpProtocols.Http2));
        builder.Services.AddGrpc(o => o.MaxReceiveMessageSize = 16 * 1024 * 1024);
        var app = builder.Build();
        app.MapGrpcService<RawDmaService>();
        return StartAsync(app);
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
