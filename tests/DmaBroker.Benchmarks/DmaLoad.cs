using System.Diagnostics;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DmaBroker.Benchmarks;

/// <summary>
/// One DMA-stream load: its requests, and how its rate is reported; <paramref name="Coalesced"/>, when
/// set, makes the same requests asking for coalesced completions (SPEC §15).
/// </summary>
internal sealed record DmaScenario(string Name, string Unit, Func<DmaRequest[]> Requests, int OpsPerMessage, int BytesPerOp, Func<DmaRequest[]>? Coalesced = null)
{
    /// <summary>Operations per second in the scenario's unit.</summary>
    public double Scale(double opsPerSecond) => Unit == "MiB/s" ? opsPerSecond * BytesPerOp / (1024 * 1024) : opsPerSecond / 1e6;
}

/// <summary>The DMA-stream load the side-by-side benchmarks put on a broker: the requests, and a pipelined run of them.</summary>
internal static class DmaLoad
{
    /// <summary>Large writes (bandwidth) and batched small writes (per-operation cost).</summary>
    public static DmaScenario[] Scenarios { get; } =
    [
        new("DMA write 64 KiB", "MiB/s", () => Writes(1, 64 * 1024), 1, 64 * 1024),
        new("DMA write 1 MiB", "MiB/s", () => Writes(1, 1024 * 1024), 1, 1024 * 1024),
        new("batched 64-byte writes (256 per batch)", "Mops/s", () => Writes(256, 64), 256, 64, () => Writes(256, 64, coalesce: true)),
    ];

    /// <summary>
    /// Device writes of <paramref name="size"/> bytes into the mapped 1 MiB at <see cref="Host.Iova"/>: 64 single
    /// ones, or one batch of <paramref name="perBatch"/>, answered with one batch_completion if <paramref name="coalesce"/>.
    /// </summary>
    public static DmaRequest[] Writes(int perBatch, int size, bool coalesce = false)
    {
        var data = ByteString.CopyFrom(Enumerable.Range(0, size).Select(i => (byte)i).ToArray());
        var slots = Math.Max(1, Host.MappedBytes / size);
        if (perBatch == 1)
            return [.. Enumerable.Range(0, 64).Select(i => new DmaRequest { Tag = (ulong)i, Write = new DmaWrite { Iova = Host.Iova + (ulong)(i % slots) * (ulong)size, Data = data } })];
        var batch = new DmaBatch { Coalesce = coalesce };
        for (var i = 0; i < perBatch; i++)
            batch.Requests.Add(new DmaRequest { Tag = (ulong)i, Write = new DmaWrite { Iova = Host.Iova + (ulong)i * 64, Data = data } });
        return [new DmaRequest { Tag = 1_000_000, Batch = batch }];
    }

    // Pipelined: keeps up to 16 messages in flight and counts completed operations per second (a
    // batch_completion counts its results).
    public static async Task<double> MeasureAsync(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call, ulong? handle, DmaRequest[] requests, int opsPerMessage, double seconds)
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
                var response = call.ResponseStream.Current;
                if (response.BatchCompletion is { } coalesced)
                {
                    if (coalesced.Results.Count != opsPerMessage)
                        throw new InvalidOperationException($"{coalesced.Results.Count} results for a batch of {opsPerMessage}");
                    for (var i = 0; i < coalesced.Results.Count; i++)
                    {
                        if (!coalesced.Results[i].Ok)
                            throw new InvalidOperationException($"DMA failed: {coalesced.Results[i]}");
                    }
                    completed += opsPerMessage;
                    inFlight.Release();
                    continue;
                }
                var c = response.Completion;
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
}

/// <summary>
/// What a side-by-side DMA section runs against: an in-process broker with a session whose edu
/// device has <see cref="Host.MappedBytes"/> mapped at <see cref="Host.Iova"/>, and the raw gRPC
/// service beside it, each on its own loopback port and client connection.
/// </summary>
internal sealed class DmaPair : IAsyncDisposable
{
    private readonly Host _broker;
    private readonly Host _raw;
    private readonly BrokerClient _brokerClient;
    private readonly BrokerClient _rawClient;

    private DmaPair(Host broker, Host raw, BrokerClient brokerClient, BrokerClient rawClient, BrokerSession session, ulong handle)
    {
        (_broker, _raw, _brokerClient, _rawClient, Session, Handle) = (broker, raw, brokerClient, rawClient, session, handle);
    }

    /// <summary>The broker's session.</summary>
    public BrokerSession Session { get; }

    /// <summary>The open edu device's handle, for <c>open{handle}</c>.</summary>
    public ulong Handle { get; }

    /// <summary>A new DMA stream on the broker.</summary>
    public AsyncDuplexStreamingCall<DmaRequest, DmaResponse> BrokerStream() => Session.Raw.Dma.Stream();

    /// <summary>A new stream on the raw service.</summary>
    public AsyncDuplexStreamingCall<DmaRequest, DmaResponse> RawStream() => new Dma.DmaClient(_rawClient.Raw.Channel).Stream();

    public static async Task<DmaPair> StartAsync(string sessionName)
    {
        var broker = await Host.StartBrokerAsync();
        var raw = await Host.StartRawAsync();
        var brokerClient = BrokerClient.Connect(broker.Address);
        var rawClient = BrokerClient.Connect(raw.Address);
        var session = await brokerClient.OpenSessionAsync(sessionName);
        return new DmaPair(broker, raw, brokerClient, rawClient, session, await Host.PrepareDeviceAsync(session));
    }

    public async ValueTask DisposeAsync()
    {
        await Session.DisposeAsync();
        _brokerClient.Dispose();
        _rawClient.Dispose();
        await _raw.DisposeAsync();
        await _broker.DisposeAsync();
    }
}
