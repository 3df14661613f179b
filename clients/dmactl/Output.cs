using System.Globalization;
using Google.Protobuf;

namespace DmaBroker.Ctl;

/// <summary>Tables for people, JSON for scripts.</summary>
internal sealed class Output(TextWriter writer, bool json)
{
    private static readonly JsonFormatter Formatter = new(JsonFormatter.Settings.Default.WithFormatDefaultValues(true));

    public bool Json => json;

    public TextWriter Writer => writer;

    public void Message(IMessage message) => writer.WriteLine(Formatter.Format(message));

    public void Line(string text) => writer.WriteLine(text);

    /// <summary>Writes rows under a header, each column as wide as its widest cell.</summary>
    public void Table(string[] header, IEnumerable<string[]> rows)
    {
        var all = new List<string[]> { header };
        all.AddRange(rows);
        var widths = new int[header.Length];
        foreach (var row in all)
        {
            for (var i = 0; i < row.Length; i++)
                widths[i] = Math.Max(widths[i], row[i].Length);
        }
        foreach (var row in all)
            writer.WriteLine(string.Join("  ", row.Select((cell, i) => i == row.Length - 1 ? cell : cell.PadRight(widths[i]))).TrimEnd());
    }

    public static string Hex(uint value, int digits) => value.ToString("x" + digits.ToString(CultureInfo.InvariantCulture), CultureInfo.InvariantCulture);
}
