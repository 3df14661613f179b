namespace DmaBroker.Ctl;

/// <summary>"Did you mean": the closest of some known words, for a driver name or a command.</summary>
internal static class Spelling
{
    /// <summary>
    /// The candidate nearest to <paramref name="word"/> by edit distance (with <c>_</c> and
    /// <c>-</c> the same letter, as module names use both), if it is near enough to be a typo.
    /// </summary>
    public static string? Closest(string word, IEnumerable<string> candidates)
    {
        var best = (Word: (string?)null, Distance: int.MaxValue);
        foreach (var candidate in candidates)
        {
            var distance = Distance(Fold(word), Fold(candidate));
            if (distance < best.Distance)
                best = (candidate, distance);
        }
        return best.Distance <= Math.Max(2, word.Length / 3) ? best.Word : null;
    }

    private static string Fold(string word) => word.ToLowerInvariant().Replace('_', '-');

    // Levenshtein distance, one row at a time.
    private static int Distance(string a, string b)
    {
        var previous = new int[b.Length + 1];
        var current = new int[b.Length + 1];
        for (var j = 0; j <= b.Length; j++)
            previous[j] = j;
        for (var i = 1; i <= a.Length; i++)
        {
            current[0] = i;
            for (var j = 1; j <= b.Length; j++)
                current[j] = Math.Min(Math.Min(current[j - 1] + 1, previous[j] + 1), previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            (previous, current) = (current, previous);
        }
        return previous[b.Length];
    }
}
