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
}
