namespace DmaBroker.Benchmarks;

/// <summary>
/// One row of the benchmark table: what was measured, its result, and the baseline measured beside
/// it in the same run (alternating rounds, so machine noise hits both alike).
/// </summary>
/// <param name="Name">What the row measures, e.g. "DMA write 64 KiB".</param>
/// <param name="Result">The measurement with its unit, e.g. "1234 MiB/s" or "p50 41 / p99 88 µs".</param>
/// <param name="Baseline">The baseline's name and measurement, e.g. "raw gRPC stream 1500 MiB/s", or "—" when the row has none.</param>
/// <param name="Ratio">Result over baseline, e.g. "82 %" or "2.03x", or "" when there is no baseline.</param>
/// <param name="Detail">What a reader needs to trust the row: rounds, every round's value, counts.</param>
internal sealed record BenchRow(string Name, string Result, string Baseline = "—", string Ratio = "", string Detail = "");

/// <summary>How long each section measures: <paramref name="Rounds"/> rounds of <paramref name="Seconds"/> per side; <paramref name="Quick"/> shrinks the large scales for a smoke run.</summary>
internal sealed record BenchOptions(int Rounds, double Seconds, bool Quick);

/// <summary>One section of the table: a scenario that measures its rows (and their baselines) when run.</summary>
internal interface IBenchSection
{
    /// <summary>The short name that selects this section alone on the command line.</summary>
    string Key { get; }

    /// <summary>Measures the section's rows.</summary>
    Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options);
}
