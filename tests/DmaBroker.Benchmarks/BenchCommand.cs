using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;

namespace DmaBroker.Benchmarks;

/// <summary>
/// The benchmark command: parses the arguments, runs the chosen sections one after another and
/// ends standard output with one markdown table of all their rows, headed by the machine's facts.
/// Progress and a failing section's error go to standard error, so the table is what stdout ends with.
/// </summary>
internal static class BenchCommand
{
    /// <summary>Rounds per side unless <c>--rounds</c> says otherwise.</summary>
    public const int DefaultRounds = 5;

    /// <summary>Seconds per side and round unless <c>--seconds</c> says otherwise.</summary>
    public const double DefaultSeconds = 1.0;

    /// <summary>Seconds per side and round of a <c>--quick</c> run unless <c>--seconds</c> says otherwise.</summary>
    public const double QuickSeconds = 0.2;

    private const string Usage = """
        usage: dotnet run -c Release --project tests/DmaBroker.Benchmarks -- [KEY ...] [options]

        Runs the benchmark sections named by KEY (all of them when none is named), each row side by side
        with its baseline in alternating rounds, and prints one markdown table of every row.

        options:
          --rounds N     counted rounds per side (default 5, with --quick 1; sections add warm-up rounds)
          --seconds S    seconds per side and round (default 1.0, with --quick 0.2)
          --quick        smaller scales, no warm-up, one-shot micro-benchmarks: a smoke run, not a measurement
          --list         print the section keys, one a line, and exit
          -h, --help     print this and exit
        """;

    /// <summary>Runs the command; returns the process's exit code: 0, 1 when a section failed, 2 for bad arguments.</summary>
    public static async Task<int> RunAsync(string[] args, IReadOnlyList<IBenchSection> sections, TextWriter stdout, TextWriter stderr)
    {
        var parsed = Parse(args, sections);
        if (parsed.Error is { } error)
        {
            await stderr.WriteLineAsync($"benchmarks: {error} (see --help)");
            return 2;
        }
        if (parsed.Help)
        {
            await stdout.WriteLineAsync(Usage);
            await stdout.WriteLineAsync("sections: " + string.Join(' ', sections.Select(s => s.Key)));
            return 0;
        }
        if (parsed.List)
        {
            foreach (var section in sections)
                await stdout.WriteLineAsync(section.Key);
            return 0;
        }

        var chosen = parsed.Keys.Count == 0 ? sections : [.. sections.Where(s => parsed.Keys.Contains(s.Key))];
        var options = parsed.Options;
        var loadBefore = Rounds.LoadAverageValues();
        var started = DateTime.UtcNow;
        var clock = Stopwatch.StartNew();
        var results = new List<(string Key, IReadOnlyList<BenchRow> Rows)>();
        var failed = false;
        foreach (var section in chosen)
        {
            await stderr.WriteLineAsync($"[{clock.Elapsed:mm\\:ss}] {section.Key}...");
            try
            {
                results.Add((section.Key, await section.RunAsync(options)));
            }
            catch (Exception e)
            {
                failed = true;
                await stderr.WriteLineAsync($"benchmarks: section {section.Key} failed: {e}");
                results.Add((section.Key, [new BenchRow($"{section.Key}: failed", e.GetType().Name + ": " + e.Message.ReplaceLineEndings(" "))]));
            }
        }
        await stdout.WriteLineAsync();
        await stdout.WriteLineAsync($"DmaBroker benchmarks, {started:yyyy-MM-dd HH:mm} UTC: {Environment.ProcessorCount} cores, load average {loadBefore} at the start and "
            + $"{Rounds.LoadAverageValues()} at the end, {RuntimeInformation.FrameworkDescription}, {RuntimeInformation.OSDescription}, "
            + $"{options.Rounds} rounds x {options.Seconds.ToString("0.0##", CultureInfo.InvariantCulture)} s per side{(options.Quick ? ", --quick (a smoke run, not a measurement)" : "")}, "
            + $"{clock.Elapsed.TotalSeconds:F0} s in all");
        await stdout.WriteLineAsync();
        await WriteTableAsync(stdout, results.SelectMany(r => r.Rows.Select(row => (r.Key, row))));
        return failed ? 1 : 0;
    }

    /// <summary>The table: one line per row, then each row's detail as a numbered note.</summary>
    public static async Task WriteTableAsync(TextWriter output, IEnumerable<(string Key, BenchRow Row)> rows)
    {
        await output.WriteLineAsync("| section | row | result | baseline | ratio |");
        await output.WriteLineAsync("| --- | --- | ---: | ---: | ---: |");
        var notes = new List<string>();
        foreach (var (key, row) in rows)
        {
            var name = Cell(row.Name);
            if (row.Detail.Length > 0)
            {
                notes.Add(row.Detail);
                name += $" [{notes.Count}]";
            }
            await output.WriteLineAsync($"| {key} | {name} | {Cell(row.Result)} | {Cell(row.Baseline)} | {Cell(row.Ratio)} |");
        }
        await output.WriteLineAsync();
        for (var i = 0; i < notes.Count; i++)
            await output.WriteLineAsync($"[{i + 1}] {notes[i].ReplaceLineEndings(" ")}  ");
    }

    private static string Cell(string text) => text.ReplaceLineEndings(" ").Replace("|", "\\|", StringComparison.Ordinal);

    private sealed record Parsed(List<string> Keys, BenchOptions Options, bool Help, bool List, string? Error);

    /// <summary>Strict: an unknown option or key, a missing or bad value, is an error naming it.</summary>
    private static Parsed Parse(string[] args, IReadOnlyList<IBenchSection> sections)
    {
        var keys = new List<string>();
        int? rounds = null;
        double? seconds = null;
        bool quick = false, help = false, list = false;
        for (var i = 0; i < args.Length; i++)
        {
            var arg = args[i];
            switch (arg)
            {
                case "--rounds":
                    if (!Value(i++, out int r) || r < 1)
                        return Fail("--rounds takes a whole number of at least 1");
                    rounds = r;
                    break;
                case "--seconds":
                    if (!Value(i++, out double s) || !(s > 0 && s <= 3600))
                        return Fail("--seconds takes a number of seconds above 0 and at most 3600");
                    seconds = s;
                    break;
                case "--quick":
                    quick = true;
                    break;
                case "--list":
                    list = true;
                    break;
                case "-h" or "--help":
                    help = true;
                    break;
                case var _ when arg.StartsWith('-'):
                    return Fail($"unknown option '{arg}'");
                case var _ when sections.Any(s => s.Key == arg):
                    if (!keys.Contains(arg))
                        keys.Add(arg);
                    break;
                default:
                    return Fail($"unknown section '{arg}' (sections: {string.Join(' ', sections.Select(s => s.Key))})");
            }
        }
        // A quick run defaults to one short round per side.
        var options = new BenchOptions(rounds ?? (quick ? 1 : DefaultRounds), seconds ?? (quick ? QuickSeconds : DefaultSeconds), quick);
        return new Parsed(keys, options, help, list, null);

        static Parsed Fail(string error) => new([], new BenchOptions(DefaultRounds, DefaultSeconds, false), false, false, error);

        bool Value<T>(int at, out T value) where T : IParsable<T>
        {
            value = default!;
            return at + 1 < args.Length && T.TryParse(args[at + 1], CultureInfo.InvariantCulture, out value!);
        }
    }
}
