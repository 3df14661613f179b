namespace DmaBroker.Server.Tests;

/// <summary>The test's Prometheus parser reads what the format allows and refuses what it does not.</summary>
public sealed class PrometheusTextTests
{
    [Fact]
    public void Parse_TypesEscapesInfinitiesAndTimestamps_Read()
    {
        var text = PrometheusText.Parse("""
            # HELP x_total A counter.
            # TYPE x_total counter
            x_total{a="q\"uote",b="back\\slash",c="new\nline"} 3 1700000000000
            # TYPE h histogram
            h_bucket{le="+Inf"} 7
            g -Inf
            """.Replace("\r", "", StringComparison.Ordinal));

        Assert.Equal("counter", text.Types["x_total"]);
        Assert.Equal(3, text.Value("x_total", ("a", "q\"uote"), ("b", "back\\slash"), ("c", "new\nline")));
        Assert.Equal(7, text.Value("h_bucket", ("le", "+Inf")));
        Assert.Equal(double.NegativeInfinity, text.Value("g"));
        Assert.Equal(0, text.ValueOrZero("absent"));
    }

    [Theory]
    [InlineData("x{a=1} 2")]
    [InlineData("x{a=\"1\" 2")]
    [InlineData("x 2 3 4")]
    [InlineData("x two")]
    [InlineData("{a=\"1\"} 2")]
    public void Parse_NotPrometheusText_Throws(string line)
    {
        Assert.Throws<FormatException>(() => PrometheusText.Parse(line));
    }
}
