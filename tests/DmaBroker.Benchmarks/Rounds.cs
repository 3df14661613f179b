namespace DmaBroker.Benchmarks;

/// <summary>Summaries of a benchmark's rounds.</summary>
internal static class Rounds
{
    /// <summary>The middle value (the upper middle of an even count): one noisy round cannot move it far.</summary>
    public static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted[sorted.Count / 2];
    }

    /// <summary>The machine's load average, for the report (other processes share the cores), or nothing off Linux.</summary>
    public static string LoadAverage() =>
        File.Exists("/proc/loadavg") ? $", load average {string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3))}" : "";
}
