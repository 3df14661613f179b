using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Diagnosers;
using BenchmarkDotNet.Exporters;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Loggers;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;

namespace DmaBroker.Benchmarks;

/// <summary>
/// BenchmarkDotNet micro-benchmarks of the core's hot paths (<see cref="TranslationBenchmarks"/> and
/// the classes beside it; <see cref="Lookup"/> and <see cref="Core"/> are the two sections), in this process (its in-process emit toolchain) with a short job: 3
/// warm-up and 3 measured iterations, or one shot under <c>--quick</c>. Each result becomes a row,
/// mean ns per operation and bytes allocated, beside its baseline. BenchmarkDotNet's own log and
/// summaries go to files under BenchmarkDotNet.Artifacts/, not to the console.
/// </summary>
internal sealed class MicroSection(string key, Type[] benchmarks, Func<IReadOnlyList<MicroRow>> rows) : IBenchSection
{
    private const string Artifacts = "BenchmarkDotNet.Artifacts";

    /// <summary>The larger mapping count of <see cref="TranslationBenchmarks"/>: 65,535, or 1,024 in a quick run.</summary>
    public static int ManyMappings { get; private set; } = 65535;

    /// <summary>IOVA translation: a 64-byte device write with 16 mappings beside a copy of 64 bytes, and with 65,535 beside 16.</summary>
    public static MicroSection Lookup { get; } = new("lookup", [typeof(TranslationBenchmarks), typeof(CopyBenchmarks)], () =>
    [
        new("core: 64-byte device DMA write, 16 mappings", "DmaWrite64(16)", "64-byte span copy", "Copy64()"),
        new($"core: 64-byte device DMA write, {ManyMappings:N0} mappings", $"DmaWrite64({ManyMappings})", "16 mappings", "DmaWrite64(16)"),
    ]);

    /// <summary>A claim and release on the core, and a coalesced batch as the DMA service runs it.</summary>
    public static MicroSection Core { get; } = new("micro", [typeof(ClaimBenchmarks), typeof(CoalescedBenchmarks)], () =>
    [
        new("core: claim+release (SetContainer + UnsetContainer)", "ClaimRelease()", "GetGroupStatus x2", "GroupStatusTwice()"),
        new("server: a write of a coalesced batch of 256 64-byte writes", "CoalescedBatch()", "core DmaWrite alone", "CoreWrites()"),
    ]);

    public string Key => key;

    public Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        ManyMappings = options.Quick ? 1024 : 65535;
        var job = (options.Quick ? Job.Dry : Job.ShortRun).WithToolchain(InProcessEmitToolchain.Instance);
        var log = Path.GetFullPath(Path.Combine(Artifacts, key + ".log"));
        Directory.CreateDirectory(Artifacts);
        using var logger = new StreamLogger(log);
        var config = ManualConfig.CreateEmpty()
            .AddJob(job)
            .AddDiagnoser(MemoryDiagnoser.Default)
            .AddColumnProvider(DefaultColumnProviders.Instance)
            .AddExporter(MarkdownExporter.GitHub)
            .AddLogger(logger)
            .WithArtifactsPath(Path.GetFullPath(Artifacts))
            // A quick run may be a Debug build (the smoke test's): BenchmarkDotNet refuses those by default.
            .WithOptions(options.Quick ? ConfigOptions.DisableOptimizationsValidator : ConfigOptions.Default);
        var summaries = BenchmarkRunner.Run(benchmarks, config);
        var results = summaries.SelectMany(s => s.Reports).ToDictionary(Name, r => r);
        var jobText = options.Quick ? "one shot (--quick)" : "3 warm-up + 3 measured iterations";
        return Task.FromResult<IReadOnlyList<BenchRow>>([.. rows().Select(r => Row(r.Name, r.Benchmark, r.BaselineName, r.Baseline))]);

        BenchRow Row(string name, string benchmark, string baselineName, string baseline)
        {
            if (!results.TryGetValue(benchmark, out var measured) || !results.TryGetValue(baseline, out var reference)
                || measured.ResultStatistics is not { } m || reference.ResultStatistics is not { } b)
                throw new InvalidOperationException($"BenchmarkDotNet has no result for {benchmark} or {baseline}: see {log}");
            return new BenchRow(name, $"{Rounds.Format(m.Mean, 1, "ns/op")}, {Allocated(measured)}", $"{baselineName} {Rounds.Format(b.Mean, 1, "ns/op")}, {Allocated(reference)}",
                Rounds.Percent(m.Mean / b.Mean),
                $"BenchmarkDotNet in-process, {jobText}: mean ± stddev {m.Mean:F1} ± {m.StandardDeviation:F1} ns (n = {m.N}); baseline {b.Mean:F1} ± {b.StandardDeviation:F1} ns (n = {b.N})");
        }
    }

    /// <summary>"Method(params)", e.g. "DmaWrite64(16)" or "Copy64()".</summary>
    private static string Name(BenchmarkReport report) =>
        $"{report.BenchmarkCase.Descriptor.WorkloadMethod.Name}({string.Join(",", report.BenchmarkCase.Parameters.Items.Select(p => p.Value))})";

    private static string Allocated(BenchmarkReport report) =>
        report.GcStats.GetBytesAllocatedPerOperation(report.BenchmarkCase) is { } bytes ? $"{bytes} B" : "? B";
}

/// <summary>A row of a <see cref="MicroSection"/>: its benchmark and its baseline's, named "Method(params)".</summary>
internal sealed record MicroRow(string Name, string Benchmark, string BaselineName, string Baseline);
