using System.Diagnostics;
using DmaBroker.Protocol.V1;
using Grpc.Core;

namespace DmaBroker.Benchmarks;

/// <summary>
/// The latency of one DMA operation: a 64-byte device write over <c>Dma.Stream</c> with one request
/// in flight, sent, completed and timed, again and again; beside it the same ping-pong on a raw gRPC
/// stream that answers at once (<see cref="RawDmaService"/>). Each round's p50 and p99 over all its
/// samples; the row shows the median round's.
/// </summary>
internal sealed class RoundTripSection : IBenchSection
{
    public string Key => "rtt";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        await using var pair = await DmaPair.StartAsync("bench-rtt");
        var request = DmaLoad.Writes(1, 64)[0];
        var rounds = await Rounds.AlternateAsync(options, options.Quick ? 0 : 1,
            () => PingPongAsync(pair.BrokerStream(), pair.Handle, request, options.Seconds),
            () => PingPongAsync(pair.RawStream(), null, request, options.Seconds));
        var (p50, p99) = Summary(rounds[0]);
        var (rawP50, rawP99) = Summary(rounds[1]);
        return
        [
            new BenchRow("single DMA op round trip (64-byte write), p50 / p99", $"{p50:F0} / {p99:F0} µs", $"raw gRPC ping-pong {rawP50:F0} / {rawP99:F0} µs",
                $"{Rounds.Percent(p50 / rawP50)} / {Rounds.Percent(p99 / rawP99)}",
                $"one request in flight; median of {rounds[0].Count} rounds' p50 / p99 (µs): {Each(rounds[0])}; baseline {Each(rounds[1])}; "
                + $"{rounds[0].Sum(r => r.Length):N0} and {rounds[1].Sum(r => r.Length):N0} samples"),
        ];

        static (double P50, double P99) Summary(List<double[]> rounds) =>
            (Rounds.Median(rounds.Select(r => Rounds.Percentile(r, 0.50))), Rounds.Median(rounds.Select(r => Rounds.Percentile(r, 0.99))));

        static string Each(List<double[]> rounds) =>
            string.Join(", ", rounds.Select(r => $"{Rounds.Percentile(r, 0.50):F0}/{Rounds.Percentile(r, 0.99):F0}"));
    }

    /// <summary>Sends <paramref name="request"/> and waits for its completion, for <paramref name="seconds"/>: every round trip in µs.</summary>
    private static async Task<double[]> PingPongAsync(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call, ulong? handle, DmaRequest request, double seconds)
    {
        using var _ = call;
        await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = handle ?? 0 } });
        var samples = new List<double>();
        var deadline = TimeSpan.FromSeconds(seconds);
        var run = Stopwatch.StartNew();
        while (run.Elapsed < deadline)
        {
            var start = Stopwatch.GetTimestamp();
            await call.RequestStream.WriteAsync(request);
            while (true)
            {
                if (!await call.ResponseStream.MoveNext())
                    throw new InvalidOperationException("the DMA stream ended early");
                if (call.ResponseStream.Current.Completion is { } completion)
                {
                    if (!completion.Ok)
                        throw new InvalidOperationException($"DMA failed: {completion}");
                    break;
                }
            }
            samples.Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds);
        }
        await call.RequestStream.CompleteAsync();
        while (await call.ResponseStream.MoveNext())
        {
        }
        return [.. samples];
    }
}
