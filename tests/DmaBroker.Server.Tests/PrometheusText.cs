using System.Globalization;
using System.Text;

namespace DmaBroker.Server.Tests;

/// <summary>One sample of a scrape: a metric name, its labels and its value.</summary>
public sealed record PrometheusSample(string Name, IReadOnlyDictionary<string, string> Labels, double Value);

/// <summary>
/// The Prometheus text exposition format (0.0.4), parsed strictly: <c># TYPE</c> lines give each
/// family's type, <c># HELP</c> and other comments are skipped, and every other line must be
/// <c>name{label="value",…} value [timestamp]</c> with label values escaped as the format says
/// (<c>\\</c>, <c>\"</c>, <c>\n</c>). A line that is none of these fails the parse.
/// </summary>
public sealed class PrometheusText
{
    private PrometheusText(IReadOnlyList<PrometheusSample> samples, IReadOnlyDictionary<string, string> types)
    {
        Samples = samples;
        Types = types;
    }

    public IReadOnlyList<PrometheusSample> Samples { get; }

    /// <summary>Family name → counter, gauge, histogram, summary or untyped.</summary>
    public IReadOnlyDictionary<string, string> Types { get; }

    public static PrometheusText Parse(string text)
    {
        var samples = new List<PrometheusSample>();
        var types = new Dictionary<string, string>(StringComparer.Ordinal);
        var number = 0;
        foreach (var line in text.Split('\n'))
        {
            number++;
            if (line.Length == 0)
                continue;
            try
            {
                if (line.StartsWith('#'))
                {
                    var parts = line.Split(' ', 4, StringSplitOptions.RemoveEmptyEntries);
                    if (parts is ["#", "TYPE", var family, var type])
                        types.Add(family, type);
                    continue;
                }
                samples.Add(ParseSample(line));
            }
            catch (Exception e) when (e is FormatException or ArgumentException or IndexOutOfRangeException)
            {
                throw new FormatException($"line {number} is not Prometheus text: {line}", e);
            }
        }
        return new PrometheusText(samples, types);
    }

    /// <summary>The value of the one sample named <paramref name="name"/> whose labels include <paramref name="labels"/>; fails unless there is exactly one.</summary>
    public double Value(string name, params (string Key, string Value)[] labels)
    {
        var matches = Matching(name, labels);
        Assert.True(matches.Count == 1, $"expected one sample {Describe(name, labels)}, found {matches.Count}");
        return matches[0].Value;
    }

    /// <summary>As <see cref="Value"/>, but 0 when no such sample exists yet (a counter is exported once first counted).</summary>
    public double ValueOrZero(string name, params (string Key, string Value)[] labels)
    {
        var matches = Matching(name, labels);
        Assert.True(matches.Count <= 1, $"expected at most one sample {Describe(name, labels)}, found {matches.Count}");
        return matches.Count == 0 ? 0 : matches[0].Value;
    }

    private List<PrometheusSample> Matching(string name, (string Key, string Value)[] labels) =>
        [.. Samples.Where(s => s.Name == name && labels.All(l => s.Labels.TryGetValue(l.Key, out var v) && v == l.Value))];

    private static string Describe(string name, (string Key, string Value)[] labels) =>
        $"{name}{{{string.Join(",", labels.Select(l => $"{l.Key}=\"{l.Value}\""))}}}";

    private static PrometheusSample ParseSample(string line)
    {
        var at = 0;
        while (at < line.Length && (char.IsAsciiLetterOrDigit(line[at]) || line[at] is '_' or ':'))
            at++;
        if (at == 0 || char.IsAsciiDigit(line[0]))
            throw new FormatException("a sample starts with a metric name");
        var name = line[..at];
        var labels = new Dictionary<string, string>(StringComparer.Ordinal);
        if (at < line.Length && line[at] == '{')
        {
            at++;
            while (line[at] != '}')
            {
                var equals = line.IndexOf('=', at);
                var key = line[at..equals];
                if (key.Length == 0 || !key.All(c => char.IsAsciiLetterOrDigit(c) || c == '_'))
                    throw new FormatException($"bad label name '{key}'");
                if (line[equals + 1] != '"')
                    throw new FormatException("a label value is quoted");
                at = equals + 2;
                var value = new StringBuilder();
                while (line[at] != '"')
                {
                    if (line[at] == '\\')
                    {
                        at++;
                        value.Append(line[at] switch
                        {
                            '\\' => '\\',
                            '"' => '"',
                            'n' => '\n',
                            var other => throw new FormatException($"bad escape \\{other}"),
                        });
                    }
                    else
                    {
                        value.Append(line[at]);
                    }
                    at++;
                }
                labels.Add(key, value.ToString());
                at++;
                if (line[at] == ',')
                    at++;
                else if (line[at] != '}')
                    throw new FormatException("labels are separated by commas");
            }
            at++;
        }
        if (at >= line.Length || line[at] != ' ')
            throw new FormatException("a space separates the name and labels from the value");
        var fields = line[(at + 1)..].Split(' ');
        if (fields.Length is < 1 or > 2 || (fields.Length == 2 && !long.TryParse(fields[1], CultureInfo.InvariantCulture, out _)))
            throw new FormatException("a sample has a value and an optional timestamp");
        return new PrometheusSample(name, labels, ParseValue(fields[0]));
    }

    private static double ParseValue(string text) => text switch
    {
        "+Inf" => double.PositiveInfinity,
        "-Inf" => double.NegativeInfinity,
        "NaN" => double.NaN,
        _ => double.Parse(text, NumberStyles.Float, CultureInfo.InvariantCulture),
    };
}
