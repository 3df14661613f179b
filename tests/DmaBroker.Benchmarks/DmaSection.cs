namespace DmaBroker.Benchmarks;

/// <summary>
/// Pipelined DMA over <c>Dma.Stream</c> (16 messages in flight, loopback): 64 KiB and 1 MiB device
/// writes, and batches of 256 64-byte writes answered per operation or coalesced (one
/// batch_completion per batch, SPEC §15), each beside a raw gRPC stream of the same messages that
/// answers every request with a bare completion and does no broker work (<see cref="RawDmaService"/>).
/// </summary>
internal sealed class DmaSection : IBenchSection
{
    public string Key => "dma";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        await using var pair = await DmaPair.StartAsync("bench-dma");
        var rows = new List<BenchRow>();
        foreach (var scenario in DmaLoad.Scenarios)
        {
            var requests = scenario.Requests();
            var sides = new List<Func<Task<double>>>
            {
                () => DmaLoad.MeasureAsync(pair.BrokerStream(), pair.Handle, requests, scenario.OpsPerMessage, options.Seconds),
                () => DmaLoad.MeasureAsync(pair.RawStream(), null, requests, scenario.OpsPerMessage, options.Seconds),
            };
            if (scenario.Coalesced?.Invoke() is { } coalesced)
                sides.Add(() => DmaLoad.MeasureAsync(pair.BrokerStream(), pair.Handle, coalesced, scenario.OpsPerMessage, options.Seconds));
            var rates = await Rounds.AlternateAsync(options, options.Quick ? 0 : 1, [.. sides]);
            var name = scenario.Coalesced is null ? scenario.Name : scenario.Name + ", a completion per op";
            rows.Add(Rounds.Row(name, rates[0], "raw gRPC stream", rates[1], Format));
            if (rates.Length > 2)
                rows.Add(Rounds.Row(scenario.Name + ", coalesced", rates[2], "raw gRPC stream", rates[1], Format));

            string Format(double rate) => scenario.Unit == "MiB/s"
                ? Rounds.Format(scenario.Scale(rate), 0, scenario.Unit)
                : Rounds.Format(scenario.Scale(rate), 2, scenario.Unit);
        }
        return rows;
    }
}
