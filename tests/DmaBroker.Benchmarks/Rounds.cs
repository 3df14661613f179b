using System.Globalization;

namespace DmaBroker.Benchmarks;

/// <summary>Rounds of a side-by-side measurement, and their summaries.</summary>
internal static class Rounds
{
    /// <summary>The middle value (the upper middle of an even count): one noisy round cannot move it far.</summary>
    public static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted[sorted.Count / 2];
    }

    /// <summary>The value below which <paramref name="fraction"/> of <paramref name="values"/> lie (nearest rank).</summary>
    public static double Percentile(IReadOnlyList<double> values, double fraction)
    {
        var sorted = values.Order().ToList();
        return sorted[Math.Clamp((int)Math.Ceiling(fraction * sorted.Count) - 1, 0, sorted.Count - 1)];
    }

    /// <summary>The machine's load average, for the report (other processes share the cores), or nothing off Linux.</summary>
    public static string LoadAverage() =>
        File.Exists("/proc/loadavg") ? $", load average {LoadAverageValues()}" : "";

    /// <summary>The 1, 5 and 15 minute load averages, or "n/a" off Linux.</summary>
    public static string LoadAverageValues() =>
        File.Exists("/proc/loadavg") ? string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "n/a";

    /// <summary>
    /// Measures each of <paramref name="sides"/> once per round, <paramref name="warmup"/> uncounted
    /// rounds first, rotating which side goes first so that a drift of the machine hits each alike.
    /// Returns each side's counted rounds, in the order of <paramref name="sides"/>.
    /// </summary>
    public static async Task<List<T>[]> AlternateAsync<T>(BenchOptions options, int warmup, params Func<Task<T>>[] sides)
    {
        var results = sides.Select(_ => new List<T>()).ToArray();
        for (var round = -warmup; round < options.Rounds; round++)
        {
            for (var i = 0; i < sides.Length; i++)
            {
                var side = (round + warmup + i) % sides.Length;
                var value = await sides[side]();
                if (round >= 0)
                    results[side].Add(value);
            }
        }
        return results;
    }

    /// <summary>
    /// The row of a rate and its baseline's, both in rounds: medians, their ratio, and in the detail every
    /// round's value and the median of the rounds' own ratios. <paramref name="format"/> writes a rate with its unit.
    /// </summary>
    public static BenchRow Row(string name, IReadOnlyList<double> rates, string baselineName, IReadOnlyList<double> baselineRates,
        Func<double, string> format, string note = "")
    {
        var median = Median(rates);
        var baseline = Median(baselineRates);
        // Each round's two sides ran seconds apart: the median of their own ratios shrugs off a drift of the machine's load.
        var paired = Median(rates.Zip(baselineRates, (r, b) => r / b));
        return new BenchRow(name, format(median), $"{baselineName} {format(baseline)}", Percent(median / baseline),
            $"median of {rates.Count} rounds{note}: {Values(rates, format)}; baseline {Values(baselineRates, format)}; the rounds' own ratios' median {Percent(paired)}");
    }

    /// <summary>A ratio as a whole percentage, e.g. "203 %".</summary>
    public static string Percent(double ratio) => (ratio * 100).ToString("F0", CultureInfo.InvariantCulture) + " %";

    /// <summary>Every round's value, without units.</summary>
    public static string Values(IEnumerable<double> values, Func<double, string> format) =>
        string.Join(", ", values.Select(v => format(v).Split(' ')[0]));

    /// <summary>A number with <paramref name="decimals"/> decimals and thousands separators, then <paramref name="unit"/>.</summary>
    public static string Format(double value, int decimals, string unit) =>
        value.ToString("N" + decimals.ToString(CultureInfo.InvariantCulture), CultureInfo.InvariantCulture) + " " + unit;
}
